"""Accuracy with bootstrap confidence intervals, and the distillation gap closed."""

from __future__ import annotations

import random
from collections.abc import Sequence


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
