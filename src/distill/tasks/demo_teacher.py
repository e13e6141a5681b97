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
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from distill.tasks import make_task, parse_answer, prompt_text

PAD, END, USER, ASSISTANT, SYSTEM = "<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [PAD, END, USER, ASSISTANT, SYSTEM]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}<|end|>\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}<|end|>\n"
    "{% else %}<|assistant|>\n{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TOKENIZER_VOCAB = 512
MAX_NEW_TOKENS = 128
"""Enough for the longest gold solution (4 steps) with room to spare."""


# --- tokenizer ---------------------------------------------------------------------------------

# Digits are tokenized with their place value ("abacus" digits): the normalizer rewrites a
# hundreds digit as a fullwidth digit and a tens digit as a subscript digit, and the decoder maps
# them back, so "127" is the three tokens 1(hundreds) 2(tens) 7 and decodes to "127" again. A tiny
# model can then line up the digits of two numbers by content instead of by counting positions,
# which is what makes carries learnable in minutes on a CPU. Other text round-trips unchanged.
HUNDREDS = "０１２３４５６７８９"
TENS = "₀₁₂₃₄₅₆₇₈₉"


def _place_value_normalizer() -> Any:
    from tokenizers import Regex, normalizers

    rules = [normalizers.Replace(Regex(f"{d}(?=[0-9][0-9](?![0-9]))"), HUNDREDS[d])
             for d in range(10)]
    rules += [normalizers.Replace(Regex(f"{d}(?=[0-9](?![0-9]))"), TENS[d]) for d in range(10)]
    return normalizers.Sequence(rules)


def _corpus(n_rows: int, seed: int) -> Iterator[str]:
    # Every number 0..999 a few times, so each place-value digit becomes one token.
    sweep = " ".join(str(n) for n in range(1000))
    yield from [sweep] * 10
    for row in make_task("arithmetic", "train", n_rows, seed):
        yield prompt_text(row["question"])
        yield row["solution"]


def build_tokenizer(out_dir: str | Path | None = None, vocab_size: int = TOKENIZER_VOCAB,
                    n_rows: int = 4000, seed: int = 0) -> Any:
    """Train a byte-level BPE on task text (one token per digit and place) and save it.

    The full byte alphabet is kept, so any text round-trips; merges cover the task's words.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = _place_value_normalizer()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.Sequence(
        [decoders.ByteLevel()]
        + [decoders.Replace(c, str(d)) for chars in (HUNDREDS, TENS) for d, c in enumerate(chars)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(n_rows, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=END, pad_token=PAD, bos_token=None, unk_token=None,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM], model_max_length=1024,
        padding_side="left", clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


# --- models ------------------------------------------------------------------------------------

def _llama(hidden: int, layers: int, heads: int, intermediate: int, vocab_size: int,
           kv_heads: int | None = None) -> dict[str, Any]:
    return {
        "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads or heads,
        "intermediate_size": intermediate, "vocab_size": vocab_size,
        "max_position_embeddings": 512, "tie_word_embeddings": True, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_dropout": 0.0,
    }


def teacher_config(vocab_size: int = TOKENIZER_VOCAB, **overrides: Any) -> dict[str, Any]:
    """The shipped teacher's transformers config kwargs."""
    return {**_llama(192, 4, 6, 768, vocab_size), **overrides}


def student_config(vocab_size: int = TOKENIZER_VOCAB, **overrides: Any) -> dict[str, Any]:
    """The demo's compact student: >= 20x fewer parameters than `teacher_config()`."""
    return {**_llama(48, 2, 4, 192, vocab_size), **overrides}


def build_model(config: dict[str, Any], tok: Any, seed: int = 0) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(config)
    model_type = kwargs.pop("model_type")
    cfg = AutoConfig.for_model(
        model_type, **kwargs, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# --- data ----------------------------------------------------------------------------------------

def target_text(row: dict, target: str) -> str:
    """What the assistant says: the gold chain of thought, or the bare answer line."""
    if target == "cot":
        return str(row["solution"])
    if target == "label":
        return f"The answer is {row['answer']}."
    raise ValueError(f"target: {target!r}; expected 'cot' or 'label'")


def prompt_ids(tok: Any, question: str) -> list[int]:
    messages = [{"role": "user", "content": prompt_text(question)}]
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"])


def encode_sft(tok: Any, rows: Sequence[dict], target: str = "cot",
               texts: Sequence[str] | None = None) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) pairs; labels are -100 on the prompt so loss is on the answer only."""
    out = []
    for i, row in enumerate(rows):
        p = prompt_ids(tok, row["question"])
        answer = texts[i] if texts is not None else target_text(row, target)
        a = tok(answer + END, add_special_tokens=False)["input_ids"]
        out.append((p + a, [-100] * len(p) + a))
    return out


def _drill_operand(rng: random.Random) -> int:
    digits = rng.choice((1, 2, 2, 3, 3))
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _round_operand(rng: random.Random) -> int:
    return rng.randint(1, 9) * 100 if rng.random() < 0.4 else rng.randint(1, 99) * 10


def drill_equation(rng: random.Random, close_sub: float = 0.0, round_ops: float = 0.0) -> str:
    """One random ``a op b = c.`` line over the operand ranges the word problems use.

    `close_sub`: the share of subtractions whose result is small (1-200) next to a 3-digit
    first operand, like a word problem's "what is left" step (``493 - 470 = 23.``); two
    independent operands rarely make one. `round_ops`: the share of additions and subtractions
    whose operands are both multiples of 10 (of 100 for 40% of them), like the products of
    speeds and hours a word problem adds (``300 + 500 = 800.``); independent operands make one
    in a hundred."""
    op = rng.choice("+-*/")
    if op in "*/":
        a, b = rng.randint(2, 12), rng.randint(2, 12) * (10 if rng.random() < 0.2 else 1)
        if op == "/":
            return f"{a * b} / {a} = {b}."
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
        return f"{a} * {b} = {a * b}."
    rounded = bool(round_ops) and rng.random() < round_ops
    draw = _round_operand if rounded else _drill_operand
    a, b = draw(rng), draw(rng)
    if op == "-":
        if close_sub and not rounded and rng.random() < close_sub:
            a = rng.randint(100, 999)
            b = a - rng.randint(1, min(200, a - 1))
        a, b = max(a, b), min(a, b)
        return f"{a} - {b} = {a - b}."
    while a + b > 999:
        a, b = draw(rng), draw(rng)
    return f"{a} + {b} = {a + b}."


def _apply(rng: random.Random, x: int, y: int) -> tuple[str, int, int, int] | None:
    """A random op on (x, y) (maybe swapped) that keeps the result in 0..999, or None."""
    options = []
    if x + y <= 999:
        options.append(("+", x, y, x + y))
    options.append(("-", max(x, y), min(x, y), max(x, y) - min(x, y)))
    if x * y <= 999 and min(x, y) <= 12:
        options.append(("*", x, y, x * y))
    for a, b in ((x, y), (y, x)):
        if 2 <= b <= 12 and a % b == 0:
            options.append(("/", a, b, a // b))
    return rng.choice(options) if options else None


def binding_drill(rng: random.Random) -> str:
    """A short symbolic chain: numbers bound to letters, then 2-4 steps that look them up.

    ``b = 4, k = 12, q = 7.`` / ``d = b * k = 4 * 12 = 48.`` / ``w = d + q = 48 + 7 = 55.``
    Looking a value up by name (and reusing the last result) is the in-context copying that
    reading a word problem needs, without any word problem in the text.
    """
    names = rng.sample("abcdefghjkmnpqrstuvwxyz", 8)
    n_given = rng.randint(2, 4)
    values = {n: rng.choice((rng.randint(2, 12), _drill_operand(rng))) for n in names[:n_given]}
    lines = [", ".join(f"{n} = {v}" for n, v in values.items()) + "."]
    known = list(values)
    for target in names[n_given : n_given + rng.randint(2, 4)]:
        for _ in range(20):
            x, y = rng.sample(known[-3:] if len(known) > 3 else known, 2)
            step = _apply(rng, values[x], values[y])
            if step is not None:
                break
        else:
            break
        op, a, b, c = step
        na, nb = (x, y) if (values[x], values[y]) == (a, b) else (y, x)
        lines.append(f"{target} = {na} {op} {nb} = {a} {op} {b} = {c}.")
        values[target] = c
        known.append(target)
    return "\n".join(lines)


def arithmetic_drills(tok: Any, n: int, seed: int = 0, per_sequence: int = 6,
                      binding: float = 0.5, close_sub: float = 0.0, round_ops: float = 0.0
                      ) -> list[tuple[list[int], list[int]]]:
    """Plain-text "pretraining" for a base model: equation drills and letter-binding chains.

    No word problems and no chat turns: a model trained on these knows arithmetic and how to look
    numbers up in context, not how to read or solve the task's questions.
    """
    rng = random.Random(f"drills|{seed}")
    out = []
    for _ in range(n):
        if rng.random() < binding:
            text = binding_drill(rng)
        else:
            text = "\n".join(drill_equation(rng, close_sub, round_ops) for _ in range(per_sequence))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out.append((ids, list(ids)))
    return out


# --- training and evaluation --------------------------------------------------------------------

def train_causal_lm(model: Any, examples: Sequence[tuple[list[int], list[int]]], *,
                    epochs: float = 1.0, lr: float = 1e-3, batch_size: int = 32,
                    warmup_ratio: float = 0.05, weight_decay: float = 0.01, seed: int = 0,
                    pad_id: int = 0, log_every: int = 50, log: bool = True,
                    callback: Callable[[int], None] | None = None) -> dict[str, Any]:
    """A plain AdamW + cosine loop over padded batches (CPU-friendly; no Trainer overhead)."""
    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = max(1, int(steps_per_epoch * epochs))
    warmup = int(total * warmup_ratio)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    from distill.teachers.engine import make_progress

    progress = make_progress()
    bar = progress.add_task("train", total=total, info="")
    if log:
        progress.start()
    model.train()
    order: list[int] = []
    t0, cpu0, step, running = time.perf_counter(), time.process_time(), 0, 0.0
    while step < total:
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order.extend(fresh)
        idx, order = order[:batch_size], order[batch_size:]
        batch = [examples[i] for i in idx]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (x, y) in enumerate(batch):
            ids[r, : len(x)] = torch.tensor(x)
            labels[r, : len(y)] = torch.tensor(y)
            mask[r, : len(x)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        running = 0.9 * running + 0.1 * loss.item() if step > 1 else loss.item()
        progress.update(bar, completed=step, info=f"loss {running:.4f}")
        if log and (step % log_every == 0 or step == total):
            progress.console.print(f"  step {step}/{total} loss {running:.4f} "
                                   f"{time.perf_counter() - t0:.0f}s")
        if callback is not None and step % log_every == 0:
            callback(step)
            model.train()
    progress.stop()
    model.eval()
    # cpu_s / threads approximates wall time on an otherwise idle machine.
    return {"steps": total, "wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(time.process_time() - cpu0, 1), "loss": round(running, 4)}


def generate_answers(model: Any, tok: Any, questions: Sequence[str], batch_size: int = 128,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy completions (left-padded batches, longest prompts together)."""
    import torch

    order = sorted(range(len(questions)), key=lambda i: len(questions[i]))
    out: list[str] = [""] * len(questions)
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        prompts = [prompt_ids(tok, questions[i]) for i in chunk]
        width = max(map(len, prompts))
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        for r, i in enumerate(chunk):
            out[i] = tok.decode(gen[r, width:], skip_special_tokens=True).strip()
    return out


def accuracy(model: Any, tok: Any, rows: Sequence[dict], batch_size: int = 128) -> float:
    preds = generate_answers(model, tok, [r["question"] for r in rows], batch_size=batch_size)
    return sum(parse_answer(p) == str(r["answer"]) for p, r in zip(preds, rows, strict=True)) / len(
        rows)


# --- the shipped models ---------------------------------------------------------------------------

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
