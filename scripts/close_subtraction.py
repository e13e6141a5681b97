"""Bare arithmetic probes: how many of 400 prompts a model completes correctly, per probe.

The demo's hardest word-problem steps, with no word problem around them (greedy, 6 new tokens,
fixed seeds):

- `close-sub`: "distance left", `b` (miles travelled, a multiple of 10) subtracted from a trip
  `a` only 1-200 miles longer (`493 - 470 =`);
- `round-add`: "in total", the sum of two products of a speed (a multiple of 10) and hours
  (`280 + 540 =`).

    .venv/bin/python scripts/close_subtraction.py data/models/demo-student-base [MODEL_DIR ...]
"""

from __future__ import annotations

import random
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def close_sub(n: int = 400, seed: int = 123) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        b = rng.randint(4, 99) * 10
        a = b + rng.randint(1, min(200, 999 - b))
        out.append((f"{a} - {b} =", a - b))
    return out


def round_add(n: int = 400, seed: int = 123) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out: list[tuple[str, int]] = []
    while len(out) < n:
        a, b = (rng.randint(2, 12) * 10 * rng.randint(2, 6) for _ in range(2))
        if a + b < 1000:
            out.append((f"{a} + {b} =", a + b))
    return out


PROBES = {"close-sub": close_sub, "round-add": round_add}


def score(path: str, items: list[tuple[str, int]]) -> int:
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
    tok.padding_side = "left"
    enc = tok([p for p, _ in items], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(t.strip().split(".")[0].strip() == str(want)
               for (_, want), t in zip(items, texts, strict=True))


if __name__ == "__main__":
    probes = {name: make() for name, make in PROBES.items()}
    for path in sys.argv[1:]:
        print(path + ": " + ", ".join(f"{name} {score(path, items)}/{len(items)}"
                                       for name, items in probes.items()))
