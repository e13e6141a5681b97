"""Near-dedup and decontamination benchmarks on GSM8K: speed (numpy vs datasketch) and quality.

    python benchmarks/dedup.py                  # speed: 100k rows, both engines
    python benchmarks/dedup.py --rows 20000     # quicker
    python benchmarks/dedup.py quality          # near-dedup + decontam tables (~1 CPU-minute)

Speed. Corpus: GSM8K train questions as distinct originals (grown past 7.5k by splicing sentences
of three questions and re-drawing their numbers), plus planted near-copies of random originals. A
copy gets 1-2 edits (adjacent word swap, word deletion, number-preserving rephrasing such as
"How many" -> "What number of") and whitespace/case noise. Ground truth: an original and its
copies form one cluster. Precision/recall are pairwise over clusters (pairs put together that
belong together / pairs that belong together). Both engines get the same shingles, bands and
candidate check; only the hashing and LSH machinery differ. Times are wall and CPU (the CPU ratio
is the fairer one on a shared machine). Settings: word bigrams at 0.6 unless given (the README's
numbers).

Quality. All 7,473 GSM8K train questions are the originals (distinct problems; a few are template
siblings with other numbers, and those pairs count as false positives), plus one lightly edited
copy (`edits.light_edit`: 1-3 of drop / insert / re-case / punctuation / adjacent swap, numbers
intact) of each of `--copies` random originals. Recall: copies clustered with their original.
Precision: pairwise, as above. "renum": share of renumbered siblings (one number changed: a
different problem) clustered with their original, a diagnostic with no target. field=question
hashes the question alone; field=response the whole example (question + GSM8K answer, the copy
keeping the answer). Character shingles are measured by spelling each normalized text one
character per token ("_" for a space), so the engine's word n-grams are character n-grams.
Decontamination: share of GSM8K train questions flagged against GSM8K test, and share of edited
test questions caught (matched to the test item they copy), by `filter.decontaminate.ngram`.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from edits import light_edit, renumber  # noqa: E402

from distill.config import DecontamConfig, NearDedupConfig  # noqa: E402
from distill.filter.decontam import build_index  # noqa: E402
from distill.filter.dedup import lsh_bands, near_duplicate_clusters  # noqa: E402
from distill.filter.rows import words  # noqa: E402

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


# ------------------------------------------------------------------------------- quality


@dataclass(frozen=True)
class Candidate:
    """One near-dedup setting: shingle kind ("word" or "char"), n, threshold, permutations."""

    shingle: str
    ngram: int
    threshold: float
    num_perm: int = 128

    def name(self) -> str:
        b, r = lsh_bands(self.threshold, self.num_perm)
        return (f"{self.shingle:>4} n={self.ngram} t={self.threshold:.2f} "
                f"perm={self.num_perm:<3} {b:>2}x{r:<2}")


PREVIOUS = Candidate("word", 5, 0.8)
"""NearDedupConfig's defaults before issue #16."""
PROPOSED = Candidate("word", 2, 0.55)
"""The measured choice (and the proposed NearDedupConfig defaults)."""
CANDIDATES = [
    PREVIOUS, Candidate("word", 5, 0.5), Candidate("word", 3, 0.6), Candidate("word", 3, 0.5),
    Candidate("word", 2, 0.7), Candidate("word", 2, 0.6), PROPOSED, Candidate("word", 2, 0.5),
    Candidate("word", 2, 0.6, 256), Candidate("word", 1, 0.85), Candidate("word", 1, 0.8),
    Candidate("word", 1, 0.7), Candidate("char", 3, 0.8), Candidate("char", 4, 0.7),
    Candidate("char", 5, 0.7), Candidate("char", 5, 0.6), Candidate("char", 6, 0.6),
]
PREVIOUS_DECONTAM_NGRAM = 8
PROPOSED_DECONTAM_NGRAM = 10
DECONTAM_NGRAMS = [6, 7, 8, 9, 10, 11, 13, 15]


def char_view(text: str) -> str:
    """The normalized text one character per token, "_" for a space: word n-grams of it are the
    character n-grams of the normalized text (words joined by single spaces)."""
    return " ".join("_" if c == " " else c for c in " ".join(words(text)))


def load_gsm8k(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


@dataclass
class EditedCorpus:
    texts: list[str]
    truth: list[int]
    """Index of the original each text copies (its own index for an original)."""
    ops: list[tuple[str, ...]]
    """Edits of each copy (empty for an original)."""
    n_originals: int


def edited_corpus(items: Sequence[dict[str, str]], copies: int, seed: int, field: str = "question"
                  ) -> EditedCorpus:
    """Every item's text, then one lightly edited copy of each of `copies` random items. With
    field "response" a text is question + answer, and a copy edits only the question."""
    rng = random.Random(seed)
    suffix = ["\n" + it["answer"] if field == "response" else "" for it in items]
    texts = [it["question"] + end for it, end in zip(items, suffix, strict=True)]
    truth, ops = list(range(len(items))), [()] * len(items)
    for k in rng.sample(range(len(items)), copies):
        edited = light_edit(items[k]["question"], rng)
        texts.append(edited.text + suffix[k])
        truth.append(k)
        ops.append(edited.ops)
    return EditedCorpus(texts, truth, ops, len(items))


def renumbered_corpus(items: Sequence[dict[str, str]], copies: int, seed: int
                      ) -> EditedCorpus:
    """Every question, then a sibling with one number changed for `copies` random questions."""
    rng = random.Random(seed + 1000)
    texts = [it["question"] for it in items]
    truth, ops = list(range(len(items))), [()] * len(items)
    for k in rng.sample(range(len(items)), copies):
        sibling = renumber(items[k]["question"], rng)
        if sibling is not None:
            texts.append(sibling)
            truth.append(k)
            ops.append(("renumber",))
    return EditedCorpus(texts, truth, ops, len(items))


def cluster(texts: Sequence[str], cand: Candidate) -> list[int]:
    view = [char_view(t) for t in texts] if cand.shingle == "char" else list(texts)
    return near_duplicate_clusters(view, cand.threshold, cand.num_perm, cand.ngram)


@dataclass
class Tally:
    """Pooled counts over seeds: copies found (by edit count), pairs put together and right."""

    found: Counter[int]
    copies: Counter[int]
    together: int = 0
    predicted: int = 0

    @classmethod
    def empty(cls) -> Tally:
        return cls(Counter(), Counter())

    def add(self, corpus: EditedCorpus, labels: Sequence[int]) -> None:
        for i in range(corpus.n_originals, len(corpus.texts)):
            n_ops = len(corpus.ops[i])
            self.copies[n_ops] += 1
            self.found[n_ops] += labels[i] == labels[corpus.truth[i]]
        self.together += pair_count(Counter(zip(labels, corpus.truth, strict=True)))
        self.predicted += pair_count(Counter(labels))

    def recall(self, n_ops: int | None = None) -> float:
        found = self.found[n_ops] if n_ops else sum(self.found.values())
        copies = self.copies[n_ops] if n_ops else sum(self.copies.values())
        return found / copies if copies else 1.0

    def precision(self) -> float:
        return self.together / self.predicted if self.predicted else 1.0


def false_positive_pairs(corpus: EditedCorpus, labels: Sequence[int]) -> list[tuple[int, int]]:
    """Pairs of distinct originals put in one cluster: what precision loses."""
    members: dict[int, list[int]] = {}
    for i in range(corpus.n_originals):
        members.setdefault(labels[i], []).append(i)
    return [(group[0], j) for group in members.values() for j in group[1:]]


def near_table(items: Sequence[dict[str, str]], copies: int, seeds: int, field: str
               ) -> dict[Candidate, list[tuple[int, int]]]:
    """Print one row per candidate; return each candidate's false-positive pairs (seed 0)."""
    print(f"\nnear-dedup, field={field}: {len(items)} GSM8K train originals + {copies} edited "
          f"copies, seeds 0..{seeds - 1} pooled")
    print(f"{'candidate':<40} {'recall':>7} {'1 edit':>7} {'2 edits':>7} {'3 edits':>7} "
          f"{'prec':>7} {'fp pairs':>8} {'renum':>6} {'s/run':>6}")
    fps = {}
    for cand in CANDIDATES:
        tally, renum, secs = Tally.empty(), Tally.empty(), 0.0
        for seed in range(seeds):
            corpus = edited_corpus(items, copies, seed, field)
            t0 = time.perf_counter()
            labels = cluster(corpus.texts, cand)
            secs += time.perf_counter() - t0
            tally.add(corpus, labels)
            if seed == 0:
                fps[cand] = false_positive_pairs(corpus, labels)
            if field == "question":
                sibs = renumbered_corpus(items, copies, seed)
                renum.add(sibs, cluster(sibs.texts, cand))
        tag = " (previous)" if cand == PREVIOUS else " (proposed)" if cand == PROPOSED else ""
        renum_cell = f"{renum.recall():6.3f}" if field == "question" else f"{'-':>6}"
        print(f"{cand.name() + tag:<40} {tally.recall():7.4f} {tally.recall(1):7.4f} "
              f"{tally.recall(2):7.4f} {tally.recall(3):7.4f} {tally.precision():7.4f} "
              f"{len(fps[cand]):8d} {renum_cell} {secs / seeds:6.2f}")
    return fps


def show_false_positives(items: Sequence[dict[str, str]], pairs: list[tuple[int, int]],
                         cand: Candidate, limit: int = 12) -> None:
    print(f"\nfalse-positive pairs of {cand.name()} (field=question, seed 0): {len(pairs)}")
    for i, j in pairs[:limit]:
        print(f"  train {i} | {items[i]['question'][:90]}\n  train {j} | "
              f"{items[j]['question'][:90]}")


def decontam_table(train: Sequence[dict[str, str]], test: Sequence[dict[str, str]],
                   test_path: Path, seeds: int) -> None:
    print(f"\ndecontamination: {len(train)} GSM8K train questions against {len(test)} test "
          f"questions; each test question lightly edited, seeds 0..{seeds - 1} pooled")
    print(f"{'ngram':>5} {'train flagged':>15} {'edited test caught':>19} {'3 edits':>8} "
          f"{'s':>5}")
    for n in DECONTAM_NGRAMS:
        t0 = time.perf_counter()
        index = build_index([str(test_path)], "question", n)
        flagged = sum(index.find(it["question"]) is not None for it in train)
        caught, caught3, total, total3 = 0, 0, 0, 0
        for seed in range(seeds):
            rng = random.Random(seed)
            for k, it in enumerate(test):
                edited = light_edit(it["question"], rng)
                hit = index.find(edited.text)
                own = hit is not None and hit[1][1] == k
                caught, total = caught + own, total + 1
                if len(edited.ops) == 3:
                    caught3, total3 = caught3 + own, total3 + 1
        tag = (" (previous)" if n == PREVIOUS_DECONTAM_NGRAM
               else " (proposed)" if n == PROPOSED_DECONTAM_NGRAM else "")
        print(f"{n:>5} {flagged:>5} ({flagged / len(train):6.2%}) {caught / total:>19.2%} "
              f"{caught3 / max(total3, 1):>8.2%} {time.perf_counter() - t0:5.1f}{tag}")


def quality(args: argparse.Namespace) -> None:
    train = load_gsm8k(args.data)
    test = load_gsm8k(args.test)
    near, decontam = NearDedupConfig(), DecontamConfig()
    print(f"config defaults now: near ngram={near.ngram} threshold={near.threshold} "
          f"num_perm={near.num_perm}; decontaminate ngram={decontam.ngram}")
    fps = near_table(train, args.copies, args.seeds, "question")
    near_table(train, args.copies, args.seeds, "response")
    show_false_positives(train, fps[PROPOSED], PROPOSED)
    decontam_table(train, test, args.test, args.seeds)


# --------------------------------------------------------------------------------- speed


def speed(args: argparse.Namespace) -> None:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", nargs="?", choices=("speed", "quality"), default="speed")
    ap.add_argument("--rows", type=int, default=100_000, help="speed: corpus rows")
    ap.add_argument("--copy-fraction", type=float, default=0.2, help="speed: share of copies")
    # speed's settings are those the README's numbers were measured with
    ap.add_argument("--threshold", type=float, default=0.6, help="speed: near threshold")
    ap.add_argument("--num-perm", type=int, default=128, help="speed: MinHash permutations")
    ap.add_argument("--ngram", type=int, default=2, help="speed: words per shingle")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--copies", type=int, default=2000, help="quality: edited copies per seed")
    ap.add_argument("--seeds", type=int, default=3, help="quality: seeds pooled")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--test", type=Path, default=DEFAULT_DATA.with_name("test.jsonl"))
    args = ap.parse_args()
    quality(args) if args.mode == "quality" else speed(args)


if __name__ == "__main__":
    main()
