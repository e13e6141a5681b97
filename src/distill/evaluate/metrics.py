"""Accuracy with bootstrap confidence intervals, the distillation gap closed, sampled pass@k /
maj@k, and paired model comparisons (bootstrap of the difference, exact McNemar)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

from distill.answers import gold_answer, numeric_value, text_key


def accuracy(correct: Sequence[bool]) -> float:
    return sum(correct) / len(correct) if correct else 0.0


def bootstrap_ci(correct: Sequence[bool], n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> list[float]:
    """Percentile bootstrap of the mean; [acc, acc] when n_boot is 0 or there is no data."""
    n = len(correct)
    if n == 0 or n_boot == 0:
        a = accuracy(correct)
        return [a, a]
    rng = random.Random(seed)
    vals = [int(c) for c in correct]
    means = sorted(sum(vals[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo = means[int((1 - level) / 2 * n_boot)]
    hi = means[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return [round(lo, 4), round(hi, 4)]


def gap_closed(student: float, base: float, teacher: float) -> float | None:
    """(student - base) / (teacher - base): 1.0 means the student reached the teacher."""
    if teacher - base <= 1e-9:
        return None
    return round((student - base) / (teacher - base), 4)


# ------------------------------------------------------------------------ sampled metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one item from n samples with c correct (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), the chance that k of the n samples drawn without replacement
    include a correct one. Exact integer binomials: no overflow or cancellation for any n."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n (n={n}, c={c}, k={k})")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(correct_per_item: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over items; each item's list holds the correctness of its n samples."""
    if not correct_per_item:
        return 0.0
    return sum(pass_at_k(len(c), sum(c), k) for c in correct_per_item) / len(correct_per_item)


def answer_key(pred: str | None) -> str | None:
    """What makes two predictions the same vote: the exact value of a number ("18", "18.0" and
    "$18" agree; a percentage stays apart), else the casefolded text. None: no answer."""
    clean = gold_answer(pred) if pred is not None else None
    if not clean:
        return None
    value = numeric_value(clean)
    if value is not None:
        return f"num:{value[0]}{'%' if value[1] else ''}"
    return f"text:{text_key(clean)}"


def majority_vote(preds: Sequence[str | None]) -> int | None:
    """Index of the self-consistency answer among `preds` (samples in index order), or None
    when no sample has an answer. Ties go to the answer whose first vote came earliest: the
    result depends only on the samples, never on hash or dict order, and predictions.jsonl is
    enough to recompute it. Unparseable samples do not vote."""
    votes: dict[str, list[int]] = {}
    for i, p in enumerate(preds):
        key = answer_key(p)
        if key is not None:
            votes.setdefault(key, []).append(i)
    if not votes:
        return None
    best = max(votes.values(), key=lambda idx: (len(idx), -idx[0]))
    return best[0]


# ------------------------------------------------------------------------ paired comparisons


def _paired_arrays(a: Sequence[bool], b: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    if len(a) != len(b):
        raise ValueError(f"paired metrics need the same items ({len(a)} vs {len(b)})")
    return np.asarray(a, dtype=float), np.asarray(b, dtype=float)


def _boot_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """One (n_boot, n) draw of item indices, shared by every statistic of one comparison."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _percentiles(values: np.ndarray, level: float) -> list[float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [round(float(lo), 4), round(float(hi), 4)]


def paired_bootstrap_ci(a: Sequence[bool], b: Sequence[bool], n_boot: int = 1000,
                        level: float = 0.95, seed: int = 0) -> list[float]:
    """Percentile CI of accuracy(a) - accuracy(b), resampling *items* (both models' answers to
    an item move together). Pairing removes the between-item variance the two models share,
    so the interval is narrower than one built from two independent CIs."""
    x, y = _paired_arrays(a, b)
    d = round(float(x.mean() - y.mean()), 4) if len(x) else 0.0
    if len(x) == 0 or n_boot == 0:
        return [d, d]
    idx = _boot_indices(len(x), n_boot, seed)
    return _percentiles((x - y)[idx].mean(axis=1), level)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value: under H0 the discordant items (one model right, the
    other wrong) split 50/50, so p = P(Binomial(b + c, 1/2) is at least as uneven as observed).
    Exact, not the chi-square approximation, because held-out sets often have few discordant
    items. 1.0 when there are none."""
    x, y = _paired_arrays(a, b)
    only_a = int(((x == 1) & (y == 0)).sum())
    only_b = int(((x == 0) & (y == 1)).sum())
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)


def discordant(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int]:
    """(items only a got right, items only b got right)."""
    x, y = _paired_arrays(a, b)
    return int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())


def gap_closed_ci(student: Sequence[bool], base: Sequence[bool], teacher: Sequence[bool],
                  n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> list[float] | None:
    """Bootstrap CI of (student - base) / (teacher - base), all three resampled on the same
    items. Resamples where the teacher does not beat the base are undefined and dropped; when
    more than half are, the ratio is not meaningful on this set and None is returned."""
    s, b = _paired_arrays(student, base)
    _, t = _paired_arrays(student, teacher)
    if len(s) == 0 or n_boot == 0:
        return None
    idx = _boot_indices(len(s), n_boot, seed)
    sm, bm, tm = s[idx].mean(axis=1), b[idx].mean(axis=1), t[idx].mean(axis=1)
    ok = tm - bm > 1e-9
    if ok.sum() * 2 < n_boot:
        return None
    return _percentiles((sm[ok] - bm[ok]) / (tm[ok] - bm[ok]), level)
