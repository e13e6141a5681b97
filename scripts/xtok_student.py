"""A demo base student with a *different* tokenizer, for cross-tokenizer distillation (issue #21).

The shipped demo teacher and base student share one tokenizer (place-value digits: "127" is
three tokens, hundreds / tens / units). This script builds a student base that does not: a plain
GPT-2-style byte-level BPE (numbers merge into whole-number tokens, a larger vocabulary) trained
on the same text, and a student of the demo base's architecture pretrained the way the demo base
was (`distill.tasks.demo_teacher.train_base_student`: arithmetic drills only, one epoch, the
same loop), just on fewer sequences so it fits a few CPU minutes.

    python scripts/xtok_student.py build      # -> .cache/xtok-student-base (ignored by git)
    python scripts/xtok_student.py measure    # alignment statistics, demo teacher -> this student

`build` reports the drill accuracy (greedy "a op b =" completions on fresh drills) of the new
base and, for reference, of the shipped demo base. `measure` generates demo completions with
the demo teacher as the demo pipeline does (T = 0.7, raw top-8 log-probs stored per token) and
aligns them into the student tokenizer (`distill.train.xtok`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".cache" / "xtok-student-base"
DEMO_TEACHER = ROOT / "data" / "models" / "demo-teacher"
DEMO_BASE = ROOT / "data" / "models" / "demo-student-base"


def build_tokenizer(vocab_size: int = 1024, n_rows: int = 4000, seed: int = 0,
                    split_digits: bool = False) -> Any:
    """A byte-level BPE, GPT-2 pre-tokenization, on the demo tokenizer's corpus: no normalizer
    (no place values), the demo's special tokens and chat template. Numbers merge like words
    unless `split_digits` (one token per digit, as Llama 2 / SmolLM2 do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from distill.tasks import make_task, prompt_text
    from distill.tasks.demo_tokenizer import (
        ASSISTANT,
        CHAT_TEMPLATE,
        END,
        PAD,
        SPECIAL_TOKENS,
        SYSTEM,
        USER,
    )

    def corpus() -> Any:
        sweep = " ".join(str(n) for n in range(1000))
        yield from [sweep] * 10
        for row in make_task("arithmetic", "train", n_rows, seed):
            yield prompt_text(row["question"])
            yield row["solution"]

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits
        else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=END, pad_token=PAD, bos_token=None, unk_token=None,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM], model_max_length=1024,
        padding_side="left", clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def drill_accuracy(model: Any, tok: Any, n: int = 300, seed: int = 12345) -> dict[str, float]:
    """Greedy completion of fresh "a op b =" drills (the first line of a drill sequence, as in
    pretraining); exact match of the number before the ".", overall and per operator."""
    import torch

    from distill.tasks.demo_data import drill_equation

    rng = random.Random(f"xtok-eval|{seed}")
    eqs = [drill_equation(rng, close_sub=0.5) for _ in range(n)]
    prompts = [e[: e.index("=") + 1] for e in eqs]
    answers = [e[e.index("=") + 1:].strip().rstrip(".") for e in eqs]
    hits: dict[str, list[bool]] = {}
    tok.padding_side = "left"
    model.eval()
    for start in range(0, n, 100):
        chunk = prompts[start: start + 100]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=8, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for k, seq in enumerate(out[:, enc["input_ids"].shape[1]:]):
            text = tok.decode(seq, skip_special_tokens=True)
            m = re.match(r"\s*(\d+)\.", text)
            i = start + k
            op = prompts[i].split()[1]
            hits.setdefault(op, []).append(m is not None and m.group(1) == answers[i])
    every = [h for hs in hits.values() for h in hs]
    return {"all": round(sum(every) / len(every), 4),
            **{op: round(sum(hs) / len(hs), 4) for op, hs in sorted(hits.items())}}


def build(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.records import atomic_path
    from distill.tasks.demo_data import arithmetic_drills
    from distill.tasks.demo_models import (
        build_model,
        count_params,
        student_config,
        train_causal_lm,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tok = build_tokenizer(args.vocab, seed=args.seed, split_digits=args.split_digits)
    cfg = student_config(len(tok))
    model = build_model(cfg, tok, seed=args.seed)
    drills = arithmetic_drills(tok, args.n_sequences, seed=args.seed, close_sub=0.5)
    stats = train_causal_lm(model, drills, epochs=1.0, lr=args.lr, batch_size=args.batch_size,
                            seed=args.seed, pad_id=tok.pad_token_id, log_every=250)
    demo_tok = AutoTokenizer.from_pretrained(str(DEMO_TEACHER))
    sample = "Together that is 127 + 42 = 169 dollars."
    info: dict[str, Any] = {
        "params": count_params(model), "config": cfg, "vocab_size": len(tok),
        "split_digits": args.split_digits, "data": "arithmetic drills",
        "n_sequences": args.n_sequences, "close_sub": 0.5,
        "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed, "train": stats,
        "threads": torch.get_num_threads(),
        "tokens_per_drill": round(sum(len(x) for x, _ in drills) / len(drills), 2),
        "sample_tokens": {"student": tok.convert_ids_to_tokens(tok(sample)["input_ids"]),
                          "demo_teacher": len(demo_tok(sample)["input_ids"])},
    }
    info["drill_accuracy"] = drill_accuracy(model, tok)
    base = AutoModelForCausalLM.from_pretrained(str(DEMO_BASE)).float()
    info["demo_base_drill_accuracy"] = drill_accuracy(base, AutoTokenizer.from_pretrained(
        str(DEMO_BASE)))
    out = Path(args.out)
    with atomic_path(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        info["wall_s"] = round(time.perf_counter() - t0, 1)
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    info["bytes"] = sum(f.stat().st_size for f in out.iterdir())
    return info


def demo_completions(n: int, k: int = 8, temperature: float = 0.7, seed: int = 0
                     ) -> list[tuple[list[int], list[list[tuple[int, float]]]]]:
    """The demo teacher's sampled completions of test-split questions, with the raw top-k
    log-probs at every generated position (EOS step included), as the transformers backend
    stores them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.tasks import make_task, prompt_text

    tok = AutoTokenizer.from_pretrained(str(DEMO_TEACHER))
    model = AutoModelForCausalLM.from_pretrained(str(DEMO_TEACHER)).float().eval()
    rows = make_task("arithmetic", "test", n, seed)
    prompts = [tok.apply_chat_template([{"role": "user", "content": prompt_text(r["question"])}],
                                       add_generation_prompt=True, tokenize=False) for r in rows]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=96, do_sample=True, temperature=temperature,
                             top_k=0, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    logits = torch.stack(out.logits, 1).float().log_softmax(-1)
    vals, idx = logits.topk(k, -1)
    width = enc["input_ids"].shape[1]
    result = []
    for b in range(len(rows)):
        gen = out.sequences[b, width:].tolist()
        end = next((j for j, t in enumerate(gen) if t in (tok.eos_token_id, tok.pad_token_id)),
                   len(gen))
        top = [[(int(i), round(float(v), 4)) for i, v in zip(idx[b, j], vals[b, j], strict=True)]
               for j in range(min(end + 1, len(gen)))]
        result.append((gen[:end], top))
    return result


def _tempered(step: list[tuple[int, float]], t: float) -> list[tuple[int, float]]:
    z = math.log(sum(math.exp(lp / t) for _, lp in step))
    return [(i, lp / t - z) for i, lp in step]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from distill.train.xtok import AlignStats, StudentSpeller, align, resolve_cross_tokenizer
    from distill.train.xtok_tokens import TokenText, teacher_from_ids

    teacher_tok = AutoTokenizer.from_pretrained(str(DEMO_TEACHER))
    rows = demo_completions(args.rows)
    if args.temperature != 1.0:  # the top-k as the KD loss sees it: softmax(logprob / T) on k
        rows = [(gen, [_tempered(step, args.temperature) for step in top]) for gen, top in rows]
    students = {"xtok-student-base": args.student}
    smol = ROOT / ".cache" / "real-models" / "smollm2-135m-instruct"
    if smol.exists():
        students["smollm2-135m"] = str(smol)
    spell = TokenText(teacher_tok)
    steps = [step for _, top in rows for step in top]
    alt = [sum(math.exp(lp) for _, lp in step) - max(math.exp(lp) for _, lp in step)
           for step in steps if step]
    report: dict[str, Any] = {
        "rows": len(rows), "top_k": 8, "temperature": args.temperature,
        "teacher_tokens": sum(len(g) for g, _ in rows),
        # how much there is to project: the top-k mass beside each position's most likely token
        "teacher_alternative_mass": round(sum(alt) / len(alt), 5),
        "positions_alternatives_over_1pct": round(sum(a > 0.01 for a in alt) / len(alt), 4)}
    for name, path in students.items():
        tok = AutoTokenizer.from_pretrained(path)
        speller, stats = StudentSpeller(tok), AlignStats()
        kinds: dict[str, int] = {}
        t0 = time.perf_counter()
        for gen, top in rows:
            a = align(teacher_from_ids(gen, top, teacher_tok, spell), tok, speller=speller)
            stats += a.stats
            for s in a.spans:
                kinds[s.kind] = kinds.get(s.kind, 0) + 1
        report[name] = {"mode": resolve_cross_tokenizer("auto", tok, teacher_tok),
                        **stats.summary(), "spans": kinds,
                        "align_s": round(time.perf_counter() - t0, 3)}
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["build", "measure"])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--student", default=str(OUT), help="measure: the student tokenizer")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--split-digits", action="store_true",
                    help="one token per digit (default: numbers merge, GPT-2 style)")
    ap.add_argument("--n-sequences", type=int, default=72_000)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=50, help="measure: demo completions")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="measure: temper the stored top-k first, as the KD loss does")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    info = build(args) if args.what == "build" else measure(args)
    print(json.dumps({k: v for k, v in info.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
