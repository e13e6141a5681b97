"""Near-dedup benchmark: our numpy MinHash LSH against datasketch's MinHashLSH, same run.

Corpus: GSM8K train questions as distinct originals (grown past 7.5k by splicing sentences of
three questions and re-drawing their numbers), plus planted near-copies of random originals. A
copy gets 1-2 edits (adjacent word swap, word deletion, number-preserving rephrasing such as
"How many" -> "What number of") and whitespace/case noise. Ground truth: an original and its
copies form one cluster. Precision/recall are pairwise over clusters (pairs put together that
belong together / pairs that belong together).

    python benchmarks/dedup.py                  # 100k rows
    python benchmarks/dedup.py --rows 20000     # quicker

Defaults (word 2-grams, threshold 0.6) suit short texts such as questions: one edit in a 45-word
question touches 2 bigrams but 5 five-grams, so the pipeline's default near-dedup (5-grams, 0.8,
tuned for whole question + response examples) finds only ~20% of these copies. Both engines get
the same shingles, bands and candidate check; only the hashing and LSH machinery differ. Times
are wall and CPU (the CPU ratio is the fairer one on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distill.filter.dedup import lsh_bands, near_duplicate_clusters  # noqa: E402

DEFAULT_DATA = next((p for p in (ROOT / "data/gsm8k/train.jsonl",
                                 Path("/work/shared/data/gsm8k/train.jsonl")) if p.exists()),
                    ROOT / "data/gsm8k/train.jsonl")

REPHRASE = [
    ("How many", "What number of"), ("how many", "what number of"), ("How much", "What amount"),
    ("altogether", "in total"), ("in total", "altogether"), ("each", "every"),
    ("bought", "purchased"), ("buys", "purchases"), ("has", "owns"), ("If ", "Suppose "),
    ("total", "overall"), ("wants to", "would like to"), ("does", "did"), ("gets", "receives"),
    ("twice", "two times"), ("half", "one half"), ("spent", "paid"), ("earns", "makes"),
]
_NUMBER = re.compile(r"\d[\d,.]*")


def is_number(word: str) -> bool:
    return bool(_NUMBER.search(word))


def perturb(text: str, rng: random.Random) -> str:
    """One near-copy: 1-2 edits that keep every number, then whitespace/case noise."""
    words = text.split()
    for _ in range(rng.choice((1, 1, 2))):
        op = rng.choice(("swap", "delete", "rephrase"))
        plain = [i for i, w in enumerate(words) if not is_number(w)]
        if op == "swap" and len(plain) > 2:
            i = rng.choice([i for i in plain if i + 1 < len(words) and not is_number(words[i + 1])]
                           or plain[:1])
            if i + 1 < len(words):
                words[i], words[i + 1] = words[i + 1], words[i]
        elif op == "delete" and len(plain) > 4:
            del words[rng.choice(plain)]
        else:
            joined = " ".join(words)
            options = [(a, b) for a, b in REPHRASE if a in joined]
            if options:
                a, b = rng.choice(options)
                words = joined.replace(a, b, 1).split()
    out = " ".join(words)
    noise = rng.random()
    if noise < 0.25:
        out = out.upper() if rng.random() < 0.2 else out.lower()
    elif noise < 0.5:
        out = re.sub(r" ", lambda _: rng.choice((" ", "  ", "\n", " \t")), out)
    elif noise < 0.6:
        out = "  " + out + " \n"
    return out


def spliced(questions: list[str], rng: random.Random) -> str:
    """A new distinct question: sentences from three questions, numbers re-drawn."""
    parts = []
    for q in rng.sample(questions, 3):
        sentences = re.split(r"(?<=[.?!])\s+", q)
        parts.append(rng.choice(sentences))
    text = " ".join(parts)
    return _NUMBER.sub(lambda _: str(rng.randint(2, 999)), text)


def build_corpus(path: Path, rows: int, copy_fraction: float, seed: int
                 ) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    with open(path) as fh:
        questions = [json.loads(line)["question"] for line in fh if line.strip()]
    n_orig = int(rows * (1 - copy_fraction))
    originals = list(questions[:n_orig])
    seen = set(originals)
    while len(originals) < n_orig:
        text = spliced(questions, rng)
        if text not in seen:
            seen.add(text)
            originals.append(text)
    texts, truth = list(originals), list(range(len(originals)))
    while len(texts) < rows:
        k = rng.randrange(len(originals))
        texts.append(perturb(originals[k], rng))
        truth.append(k)
    order = list(range(len(texts)))
    rng.shuffle(order)
    return [texts[i] for i in order], [truth[i] for i in order]


def pair_count(sizes: Counter[object]) -> int:
    return sum(n * (n - 1) // 2 for n in sizes.values())


def pairwise_scores(pred: list[int], truth: list[int]) -> tuple[float, float, int]:
    together = pair_count(Counter(zip(pred, truth, strict=True)))
    predicted, actual = pair_count(Counter(pred)), pair_count(Counter(truth))
    precision = together / predicted if predicted else 1.0
    recall = together / actual if actual else 1.0
    return precision, recall, predicted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--copy-fraction", type=float, default=0.2)
    ap.add_argument("--threshold", type=float, default=0.6)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--ngram", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = ap.parse_args()

    texts, truth = build_corpus(args.data, args.rows, args.copy_fraction, args.seed)
    b, r = lsh_bands(args.threshold, args.num_perm)
    print(f"corpus: {len(texts)} rows, {len(set(truth))} originals, "
          f"{len(texts) - len(set(truth))} planted copies, {pair_count(Counter(truth))} true pairs")
    print(f"params: threshold={args.threshold} num_perm={args.num_perm} ngram={args.ngram} "
          f"bands={b}x{r}")
    wall, cpu = {}, {}
    for backend in ("numpy", "datasketch"):
        t0, c0 = time.perf_counter(), time.process_time()
        labels = near_duplicate_clusters(texts, args.threshold, args.num_perm, args.ngram, backend)
        wall[backend], cpu[backend] = time.perf_counter() - t0, time.process_time() - c0
        precision, recall, predicted = pairwise_scores(labels, truth)
        rate_wall, rate_cpu = len(texts) / wall[backend], len(texts) / cpu[backend]
        print(f"{backend:>10}: wall {wall[backend]:6.2f} s ({rate_wall:7.0f} rows/s)"
              f"  cpu {cpu[backend]:6.2f} s ({rate_cpu:7.0f} rows/s)"
              f"  precision {precision:.4f}  recall {recall:.4f}  pairs {predicted}")
    print(f"speed ratio numpy / datasketch: wall {wall['datasketch'] / wall['numpy']:.1f}x, "
          f"cpu {cpu['datasketch'] / cpu['numpy']:.1f}x")


if __name__ == "__main__":
    main()
