"""The offline demo's models: a local tokenizer, the teacher, the base student, a plain trainer.

The demo needs models that run anywhere with no hub access, so this module builds them from
scratch: a byte-level BPE tokenizer (every digit its own token, with its place value; chat-role
special tokens; a Jinja chat template with ``{% generation %}`` markers) shared by every model, and
two small Llamas, both shipped in ``data/models/`` as safetensors:

- the **teacher** (``demo-teacher``, `teacher_config()`): trained from scratch on the gold chains
  of thought of `distill.tasks.arithmetic`, mixed with plain arithmetic drills;
- the **base student** (``demo-student-base``, `student_config()`, >= 20x fewer parameters):
  pretrained on arithmetic drills only — equations and letter-binding chains, never a word
  problem or a chat turn. It is the demo's stand-in for the small pretrained LM a real recipe
  distills into: it can add and look numbers up, and scores ~0% on the task until distilled.

The recipe (sizes, steps, learning rates) is ``pipelines/models/demo.yaml``:

    python -m distill.tasks.demo_teacher teacher        # -> data/models/demo-teacher
    python -m distill.tasks.demo_teacher base-student   # -> data/models/demo-student-base

The pieces: the tokenizer (`demo_tokenizer`), the data (`demo_data`), the model configs and the
training loop (`demo_models`); this module trains, scores and saves the shipped models.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distill.tasks import make_task
from distill.tasks.demo_data import (
    arithmetic_drills,
    binding_drill,
    drill_equation,
    encode_sft,
    prompt_ids,
    target_text,
)
from distill.tasks.demo_models import (
    MAX_NEW_TOKENS,
    accuracy,
    build_model,
    count_params,
    generate_answers,
    student_config,
    teacher_config,
    train_causal_lm,
)
from distill.tasks.demo_tokenizer import (
    ASSISTANT,
    CHAT_TEMPLATE,
    END,
    PAD,
    SPECIAL_TOKENS,
    SYSTEM,
    TOKENIZER_VOCAB,
    USER,
    build_tokenizer,
)

# The pieces live in demo_tokenizer, demo_data and demo_models; scripts and tests import them
# from here, the demo's one entry point.
__all__ = [
    "ASSISTANT", "CHAT_TEMPLATE", "END", "MAX_NEW_TOKENS", "PAD", "SPECIAL_TOKENS", "SYSTEM",
    "TOKENIZER_VOCAB", "USER", "accuracy", "arithmetic_drills", "binding_drill", "build_model",
    "build_tokenizer", "count_params", "drill_equation", "encode_sft", "generate_answers",
    "main", "prompt_ids", "student_config", "target_text", "teacher_config",
    "train_base_student", "train_causal_lm", "train_demo_teacher",
]


def _save(model: Any, tok: Any, out: Path, info: dict[str, Any]) -> None:
    """Write model, tokenizer and training.json into `out` in one rename (never half-written);
    a model card already there is kept."""
    import shutil

    from distill.records import atomic_path

    with atomic_path(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
        if (out / "README.md").exists():
            shutil.copy(out / "README.md", tmp / "README.md")


def train_base_student(out_dir: str | Path, n_sequences: int = 288_000, lr: float = 5e-3,
                       batch_size: int = 32, seed: int = 0, close_sub: float = 0.0,
                       round_ops: float = 0.0, config: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
    """Pretrain the demo's *base* student on plain arithmetic drills (never on word problems).

    It plays the part a small pretrained LM plays in a real recipe: it can add and look numbers
    up, but it has never seen the task's questions or its chat format, so it scores 0% on the
    task until it is distilled (the demo's `base_student_accuracy`).
    """
    out = Path(out_dir)
    t0 = time.perf_counter()
    tok = build_tokenizer(None, seed=seed)
    cfg = config or student_config(len(tok))
    model = build_model(cfg, tok, seed=seed)
    drills = arithmetic_drills(tok, n_sequences, seed=seed, close_sub=close_sub,
                                round_ops=round_ops)
    stats = train_causal_lm(model, drills, epochs=1.0,
                            lr=lr, batch_size=batch_size, seed=seed, pad_id=tok.pad_token_id,
                            log_every=500)
    info = {"params": count_params(model), "config": cfg, "data": "arithmetic drills",
            "n_sequences": n_sequences, "close_sub": close_sub,
            "round_ops": round_ops, "lr": lr,
            "batch_size": batch_size, "seed": seed,
            "train": stats, "wall_s": round(time.perf_counter() - t0, 1)}
    _save(model, tok, out, info)
    return info


def train_demo_teacher(out_dir: str | Path, n_train: int = 40_000, steps: int = 4000,
                       drill_frac: float = 0.3, lr: float = 1.5e-3, batch_size: int = 32,
                       n_dev: int = 200, eval_every: int = 500, seed: int = 0,
                       config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the teacher from scratch on gold chains of thought (plus arithmetic drills).

    Dev accuracy (a slice of the *train* split, never the test split) is measured every
    `eval_every` steps, and the model is saved to `out_dir` each time, so a long run that is
    stopped still leaves its latest checkpoint.
    """
    import torch

    out = Path(out_dir)
    t0 = time.perf_counter()
    tok = build_tokenizer(None, seed=seed)
    cfg = config or teacher_config(len(tok))
    model = build_model(cfg, tok, seed=seed)
    rows = make_task("arithmetic", "train", n_train + n_dev, seed)
    train, dev = rows[:n_train], rows[n_train:]
    examples = encode_sft(tok, train, "cot")
    examples += arithmetic_drills(tok, int(drill_frac * len(examples)), seed=seed)
    curve: list[tuple[int, float, float]] = []
    info: dict[str, Any] = {"params": count_params(model), "config": cfg, "n_train": n_train,
                            "drill_frac": drill_frac, "steps": steps, "lr": lr,
                            "batch_size": batch_size, "seed": seed, "dev_curve": curve}

    def checkpoint(step: int) -> None:
        acc = accuracy(model, tok, dev)
        curve.append((step, round(acc, 4), round(time.perf_counter() - t0, 1)))
        print(f"  dev accuracy @ {step}: {acc:.3f}", flush=True)
        _save(model, tok, out, {**info, "checkpoint_step": step})

    stats = train_causal_lm(model, examples, epochs=steps * batch_size / len(examples), lr=lr,
                            batch_size=batch_size, seed=seed, pad_id=tok.pad_token_id,
                            log_every=eval_every, callback=checkpoint)
    info["train"] = stats
    info["dev_accuracy_fp32"] = accuracy(model, tok, dev)
    # Shipped in bfloat16 (half the bytes); the dev figure is of the rounded weights, computed in
    # float32 as the demo computes.
    model.to(torch.bfloat16).to(torch.float32)
    info["dev_accuracy"] = accuracy(model, tok, dev)
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    info["threads"] = torch.get_num_threads()
    _save(model.to(torch.bfloat16), tok, out, info)
    return info


MODELS_FILE = "pipelines/models/demo.yaml"


def _recipe(path: str | None, which: str, known: set[str]) -> dict[str, Any]:
    """The `which` section of the models recipe file (teacher / base_student), or {}.

    `known`: the keys a section may hold (the command's options, plus `config`, the model's
    transformers config overrides)."""
    if not path:
        return {}
    import yaml

    p = Path(path)
    if not p.exists():
        raise SystemExit(f"{path}: file not found")
    data = yaml.safe_load(p.read_text()) or {}
    name = which.replace("-", "_")
    section = data.get(name, {})
    unknown = set(section) - known
    if unknown:
        raise SystemExit(f"{path}: {name}.{sorted(unknown)[0]}: unknown key; "
                         f"expected one of {', '.join(sorted(known))}")
    return section


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("which", choices=["teacher", "base-student"])
    ap.add_argument("--config", default=MODELS_FILE if Path(MODELS_FILE).exists() else None,
                    help="recipe file; its values are the defaults the flags override")
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=4000, help="teacher: optimizer steps")
    ap.add_argument("--n-train", type=int, default=40_000, help="teacher: CoT problems")
    ap.add_argument("--drill-frac", type=float, default=0.3)
    ap.add_argument("--n-sequences", type=int, default=288_000, help="base student: drills")
    ap.add_argument("--close-sub", type=float, default=0.0,
                    help="base student: share of subtraction drills with a small result")
    ap.add_argument("--round-ops", type=float, default=0.0,
                    help="base student: share of +/- drills on multiples of 10 or 100")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--seed", type=int, default=0)
    pre, _ = ap.parse_known_args(argv)
    known = (set(vars(pre)) - {"which"}) | {"config"}
    recipe = _recipe(pre.config, pre.which, known)
    model_config = recipe.pop("config", None)
    ap.set_defaults(**recipe)
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    vocab = TOKENIZER_VOCAB
    if args.which == "teacher":
        cfg = teacher_config(vocab, **(model_config or {}))
        info = train_demo_teacher(args.out or "data/models/demo-teacher", n_train=args.n_train,
                                  steps=args.steps, drill_frac=args.drill_frac,
                                  lr=args.lr or 1.5e-3, batch_size=args.batch_size,
                                  eval_every=args.eval_every, seed=args.seed, config=cfg)
    else:
        cfg = student_config(vocab, **(model_config or {}))
        info = train_base_student(args.out or "data/models/demo-student-base",
                                  n_sequences=args.n_sequences, lr=args.lr or 5e-3,
                                  close_sub=args.close_sub, round_ops=args.round_ops,
                                  batch_size=args.batch_size, seed=args.seed, config=cfg)
    print(json.dumps({k: v for k, v in info.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
