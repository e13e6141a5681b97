"""The self-instruct novelty filter: is a proposed instruction a near-copy of one in the pool?"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from distill.config import SelfInstructConfig
from distill.filter.dedup import near_duplicate_pairs
from distill.filter.rows import normalize_text, words


def rouge_l(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F1 of two token sequences (longest common subsequence)."""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


class NoveltyFilter:
    """The instruction pool, and whether a candidate is a near-duplicate of any member.

    minhash: filter.dedup's `near_duplicate_pairs` (MinHash LSH over word n-gram shingles, pairs
    whose Jaccard estimate reaches the threshold) over pool and candidates together; rouge_l: the
    ROUGE-L F1 of the word sequences against every member (self-instruct's rule).
    """

    def __init__(self, si: SelfInstructConfig, pool: Sequence[str] = ()) -> None:
        self.si = si
        self.pool: list[str] = [normalize_text(t) for t in pool]

    def check(self, candidates: Sequence[str]) -> list[tuple[bool, str | None]]:
        """(novel, the pool text it duplicates or None) for each candidate, in order; novel
        candidates join the pool, so later candidates are checked against them too."""
        texts = [normalize_text(t) for t in candidates]
        out: list[tuple[bool, str | None]] = []
        if self.si.novelty_metric == "rouge_l":
            pool_toks = [words(t) for t in self.pool]
            for t in texts:
                toks = words(t)
                hit = next((self.pool[k] for k, p in enumerate(pool_toks)
                            if rouge_l(toks, p) >= self.si.novelty_threshold), None)
                if hit is None:
                    pool_toks.append(toks)
                    self.pool.append(t)
                out.append((hit is None, hit))
            return out
        n_pool = len(self.pool)
        combined = [*self.pool, *texts]
        earlier: dict[int, list[int]] = defaultdict(list)
        if texts:
            pairs = near_duplicate_pairs(combined, self.si.novelty_threshold, self.si.num_perm,
                                         self.si.novelty_ngram)
            for i, j in np.asarray(pairs, dtype=np.int64).reshape(-1, 2).tolist():
                earlier[max(i, j)].append(min(i, j))
        member = [True] * n_pool + [False] * len(texts)
        for k, t in enumerate(texts):
            j = n_pool + k
            hit = next((combined[i] for i in sorted(earlier[j]) if member[i]), None)
            if hit is None and t in combined[:j] and member[combined.index(t)]:
                hit = t  # exact copies: also when too short for any shingle
            member[j] = hit is None
            if hit is None:
                self.pool.append(t)
            out.append((hit is None, hit))
        return out
