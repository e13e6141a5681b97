"""Size the offline demo: which teacher / student configs reach the targets on 2 CPU cores.

One run = build a Llama from config, train it on `arithmetic` rows (gold chain of thought, or the
bare answer for the label-only ablation), report params, wall time and greedy accuracy on a *dev*
slice carved from the train split (the held-out test split is only scored with --test).

    .venv/bin/python scripts/demo_sizing.py --hidden 64 --layers 2 --heads 4 --ff 256 \
        --n-train 3000 --epochs 3 --lr 3e-3 --target cot
    .venv/bin/python scripts/demo_sizing.py --load data/models/demo-teacher --test   # score only

Each run appends one JSON line to scripts/demo_sizing.jsonl.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from pathlib import Path

import torch

from distill.tasks import arithmetic, make_task, parse_answer
from distill.tasks.demo_teacher import (
    accuracy,
    arithmetic_drills,
    build_model,
    build_tokenizer,
    count_params,
    encode_sft,
    generate_answers,
    student_config,
    train_causal_lm,
)

LOG = Path(__file__).with_name("demo_sizing.jsonl")
STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
       "/": lambda a, b: a // b if b else -1}


def error_kinds(preds: list[str], rows: list[dict]) -> dict[str, int]:
    """First mistake per wrong answer: a wrongly copied operand, a wrong result, or the format."""
    kinds: Counter[str] = Counter()
    for pred, row in zip(preds, rows, strict=True):
        if parse_answer(pred) == row["answer"]:
            continue
        gold, got = STEP.findall(row["solution"]), STEP.findall(pred)
        kind = "format"
        for i, g in enumerate(gold):
            if i >= len(got):
                kind = "too_few_steps"
                break
            a, op, b, c = got[i]
            if (a, op, b) != g[:3]:
                kind = f"operand_step{i + 1}"
                break
            if OPS[op](int(a), int(b)) != int(c):
                kind = f"arith{op}"
                break
        kinds[kind] += 1
    return dict(kinds.most_common())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--ff", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-dev", type=int, default=300)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--warmup", type=float, default=0.05)
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--target", choices=["cot", "label"], default="cot")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--test", action="store_true", help="also score the held-out test split")
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--load", default=None, help="score a saved model directory instead")
    ap.add_argument("--save", default=None, help="save the trained model here")
    ap.add_argument("--eval-every", type=int, default=0, help="dev accuracy every N steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-value", type=int, default=None, help="override arithmetic.MAX_VALUE")
    ap.add_argument("--drill-frac", type=float, default=0.0,
                    help="extra equation-drill sequences, as a fraction of the train rows")
    ap.add_argument("--drill-only", type=int, default=0,
                    help="pretrain on this many drill sequences only (a base student)")
    ap.add_argument("--init", default=None, help="start from this saved model (same tokenizer)")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.max_value:
        arithmetic.MAX_VALUE = args.max_value
    rows = make_task("arithmetic", "train", args.n_train + args.n_dev, args.data_seed)
    train, dev = rows[: args.n_train], rows[args.n_train :]
    result: dict = {"args": vars(args)}
    if args.load or args.init:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = args.load or args.init
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        tok = build_tokenizer(None, vocab_size=args.vocab)
        cfg = student_config(len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
                             num_attention_heads=args.heads,
                             num_key_value_heads=args.kv_heads or args.heads,
                             intermediate_size=args.ff)
        model = build_model(cfg, tok, seed=args.seed)
    if not args.load:
        print(f"params {count_params(model):,}", flush=True)
        curve: list[tuple[int, float]] = []

        def dev_curve(step: int) -> None:
            curve.append((step, accuracy(model, tok, dev[:100])))
            print(f"  dev@{step} {curve[-1][1]:.3f}", flush=True)

        if args.drill_only:
            examples = arithmetic_drills(tok, args.drill_only, seed=args.seed)
        else:
            examples = encode_sft(tok, train, args.target)
            examples += arithmetic_drills(tok, int(args.drill_frac * len(train)), seed=args.seed)
        result["train"] = train_causal_lm(
            model, examples, epochs=args.epochs, lr=args.lr,
            batch_size=args.batch_size, warmup_ratio=args.warmup, weight_decay=args.wd,
            seed=args.seed, pad_id=tok.pad_token_id,
            log_every=args.eval_every or 50, callback=dev_curve if args.eval_every else None,
        )
        result["curve"] = curve
        if args.save:
            model.save_pretrained(args.save)
            tok.save_pretrained(args.save)
    result["params"] = count_params(model)
    t0 = time.perf_counter()
    preds = generate_answers(model, tok, [r["question"] for r in dev])
    hits = [parse_answer(p) == r["answer"] for p, r in zip(preds, dev, strict=True)]
    result["dev_accuracy"] = sum(hits) / len(dev)
    result["dev_errors"] = error_kinds(preds, dev)
    result["dev_eval_s"] = round(time.perf_counter() - t0, 1)
    if args.test:
        t0 = time.perf_counter()
        test = make_task("arithmetic", "test", args.n_test, 0)
        result["test_accuracy"] = accuracy(model, tok, test)
        result["test_eval_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result), flush=True)
    with LOG.open("a") as fh:
        fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
