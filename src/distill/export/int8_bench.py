"""Compare int8 methods on a real model: bytes, teacher-forced top-1 agreement, max |Δlogit|, speed.

    python -m distill.export.int8_bench MODEL_DIR [MODEL_DIR ...] [--prompts 6] [--tokens 48]

For each model: the fp32 model answers `--prompts` held-out prompts greedily (`--tokens` new
tokens; the chat template when the tokenizer has one, plain text otherwise). Every candidate then
reads the same token ids (prompt + the fp32 continuation) in one forward pass; top-1 agreement
and max |Δlogit| are over every position. Speed: greedy decoding of `--tokens` tokens from the
first prompt through the shared `Runner` loop (KV cache), tokens/s — a rough number on a shared
CPU. Candidates:

- fp32 (merged safetensors) and onnx fp32 (ORT), the yardsticks;
- torch int8 weight-only (the default int8 artifact: fp16 scale per 32 values, dequantized at
  load) and the same with one scale per row;
- torch int8 dynamic (the former default: every Linear as PyTorch dynamic int8);
- torch int8 dynamic, head kept (dynamic Linears, LM head and embedding dequantized);
- ort int8 (MatMulNBits 8-bit, block 32, `export.int8_runtime: onnxruntime`).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from distill.export.files import weight_bytes
from distill.export.runtime import Runner

PROMPTS = (
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast and bakes muffins with "
    "four. She sells the rest for $2 each. How much does she make every day?",
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is the capital of Australia, and why is it not Sydney?",
    "List three tips for sleeping better.",
    "A train travels 60 km in 45 minutes. What is its average speed in km/h?",
)


def encode(tok: Any, prompt: str) -> list[int]:
    """Chat-rendered ids when the tokenizer has a chat template, else the plain text's ids."""
    if getattr(tok, "chat_template", None):
        from distill.chat_template import render_chat

        text = render_chat(tok, [{"role": "user", "content": prompt}])
        return list(tok(text, add_special_tokens=False)["input_ids"])
    return list(tok(prompt)["input_ids"])


def sequences(ref: Runner, prompts: list[str], tokens: int) -> list[list[int]]:
    """Each prompt followed by the reference's own greedy continuation."""
    out = []
    for p in prompts:
        ids = encode(ref.tokenizer, p)
        cont, _ = ref.generate(ids, tokens)
        out.append(ids + cont)
    return out


def full_logits(runner: Runner, seq: list[int]) -> np.ndarray:
    runner.reset()
    return runner.forward(seq)


def forced(runner: Runner, seqs: list[list[int]], refs: list[np.ndarray]) -> dict[str, float]:
    """Teacher-forced agreement over every position of every sequence (one prefill each)."""
    hits, total, worst = 0, 0, 0.0
    for seq, want in zip(seqs, refs, strict=True):
        got = full_logits(runner, seq)
        hits += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += len(seq)
        worst = max(worst, float(np.abs(got - want).max()))
    return {"top1": round(hits / total, 4), "max_dlogit": round(worst, 3), "positions": total}


def speed(runner: Runner, ids: list[int], tokens: int) -> float:
    runner.generate(ids, 2)  # warm-up
    t0 = time.perf_counter()
    out, _ = runner.generate(ids, tokens)
    return round(len(out) / (time.perf_counter() - t0), 1)


def bench_model(model_dir: Path, n_prompts: int, tokens: int, work: Path) -> list[dict[str, Any]]:
    from distill.export.merge import TorchRunner, load_torch_model
    from distill.export.onnx_export import OnnxRunner, export_onnx
    from distill.export.quantize import export_int8, export_nbits, load_int8_runner
    from distill.export.runtime import load_tokenizer_dir, stop_ids

    tok = load_tokenizer_dir(model_dir)
    model = load_torch_model(model_dir)
    ref = TorchRunner(model, tok, stop_ids(tok, model_dir), "fp32")
    seqs = sequences(ref, list(PROMPTS[:n_prompts]), tokens)
    refs = [full_logits(ref, s) for s in seqs]
    first_prompt = encode(tok, PROMPTS[0])
    export_int8(model, model_dir, work / "int8")
    export_int8(model, model_dir, work / "int8-row", group=1 << 30)  # one scale per row
    export_onnx(model, model_dir, work / "onnx")
    export_nbits(work / "onnx", work / "int8-ort", 8)
    candidates: list[tuple[str, Path, Callable[[], Runner]]] = [
        ("fp32 (safetensors, PyTorch)", model_dir, lambda: ref),
        ("onnx fp32 (ORT)", work / "onnx", lambda: OnnxRunner(work / "onnx")),
        ("int8 weight-only, fp16 scale per 32 (new default)", work / "int8",
         lambda: load_int8_runner(work / "int8")),
        ("int8 weight-only, one scale per row", work / "int8-row",
         lambda: load_int8_runner(work / "int8-row")),
        ("int8 torch dynamic (old default)", work / "int8",
         lambda: load_int8_runner(work / "int8", compute="dynamic")),
        ("int8 torch dynamic, head+embedding dequantized", work / "int8",
         lambda: load_int8_runner(work / "int8", compute="dynamic-keep-head")),
        ("int8 ORT MatMulNBits (block 32)", work / "int8-ort",
         lambda: OnnxRunner(work / "int8-ort")),
    ]
    rows = []
    for name, path, load in candidates:
        runner = load()
        rows.append({"model": model_dir.name, "method": name, "bytes": weight_bytes(path),
                     **forced(runner, seqs, refs),
                     "tok_s": speed(runner, first_prompt, tokens)})
        del runner
        gc.collect()
        print(table(rows[-1:], header=not rows[:-1]), flush=True)
    return rows


def table(rows: list[dict[str, Any]], header: bool = True) -> str:
    head = ["| model | method | MB | top-1 vs fp32 | max abs dlogit | positions | tok/s |",
            "|---|---|---|---|---|---|---|"] if header else []
    return "\n".join(head + [
        f"| {r['model']} | {r['method']} | {r['bytes'] / 1e6:.1f} | {r['top1']:.4f} | "
        f"{r['max_dlogit']:.3g} | {r['positions']} | {r['tok_s']} |" for r in rows])


def main(argv: list[str] | None = None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for m in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench_model(m, args.prompts, args.tokens, Path(tmp))
    print(f"\n{table(rows)}")


if __name__ == "__main__":
    main()
