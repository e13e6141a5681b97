"""Bare close-subtraction drills: how many of 400 `a - b =` prompts a model completes correctly.

The demo's hardest word-problem step is "distance left": `b` (miles travelled, a multiple of 10)
subtracted from a trip `a` only 1-200 miles longer. This scores a model on exactly that
arithmetic with no word problem around it (greedy, 6 new tokens, fixed seed):

    .venv/bin/python scripts/close_subtraction.py data/models/demo-student-base [MODEL_DIR ...]
"""

from __future__ import annotations

import random
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def cases(n: int = 400, seed: int = 123) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        b = rng.randint(4, 99) * 10
        out.append((b + rng.randint(1, min(200, 999 - b)), b))
    return out


def score(path: str, items: list[tuple[int, int]]) -> int:
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
    tok.padding_side = "left"
    enc = tok([f"{a} - {b} =" for a, b in items], return_tensors="pt", padding=True,
              add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(t.strip().split(".")[0].strip() == str(a - b)
               for (a, b), t in zip(items, texts, strict=True))


if __name__ == "__main__":
    items = cases()
    for path in sys.argv[1:]:
        print(f"{path}: {score(path, items)}/{len(items)}")
