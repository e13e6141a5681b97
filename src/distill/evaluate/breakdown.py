"""Per-template and per-difficulty accuracy: where a student gained or lost, not just how much.

An item's *template* is the procedural generator that wrote it (`distill.tasks` rows carry
`template`); its *difficulty* is the number of reasoning steps in its gold solution: the
`steps` field of procedural rows, or for GSM8K-style solutions the calculator notes
(`<<48/2=24>>`), else the solution's lines before the `#### answer` line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from distill.config import PipelineConfig
from distill.seeds import read_rows, task_rows

GROUP_KEYS = ("template", "steps")
"""Breakdown dimensions, in report order."""
_CALC_NOTE = re.compile(r"<<[^<>]*>>")


def solution_steps(solution: Any) -> int | None:
    """Reasoning steps in a gold solution text, or None for a bare answer ("18")."""
    if not isinstance(solution, str) or "\n" not in solution and "<<" not in solution:
        return None
    notes = len(_CALC_NOTE.findall(solution))
    if notes:
        return notes
    body = solution.split("####")[0]
    lines = [ln for ln in body.splitlines() if ln.strip()]
    return len(lines) or None


def row_groups(row: dict[str, Any], answer_field: str = "answer") -> dict[str, Any]:
    """{template, steps} of one raw held-out row; None where the row does not say."""
    steps = row.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool):
        steps = solution_steps(row.get("solution")) or solution_steps(row.get(answer_field))
    template = row.get("template")
    return {"template": str(template) if template is not None else None, "steps": steps}


def item_groups(cfg: PipelineConfig, n_items: int) -> list[dict[str, Any]]:
    """Groups of the first `n_items` held-out items, aligned with `load_eval_set` (which keeps
    only id/question/answer, in the raw rows' order, then applies `limit`)."""
    e = cfg.evaluate
    assert e is not None
    if e.task is not None:
        raw = task_rows(e.task)
    elif e.dataset:
        raw = read_rows(cfg.resolve(e.dataset), "evaluate.dataset")
    else:
        return [dict.fromkeys(GROUP_KEYS) for _ in range(n_items)]
    return [row_groups(r, e.answer_field) for r in raw[:n_items]]


def breakdown(correct: Sequence[bool], groups: Sequence[dict[str, Any]]
              ) -> dict[str, dict[str, dict[str, float | int]]]:
    """{dimension: {group: {n, accuracy}}} for the dimensions some item has a value for; groups
    sorted (steps numerically). Items without a value for a dimension are left out of it."""
    out: dict[str, dict[str, dict[str, float | int]]] = {}
    for dim in GROUP_KEYS:
        tally: dict[Any, list[int]] = {}
        for ok, g in zip(correct, groups, strict=True):
            if g.get(dim) is not None:
                tally.setdefault(g[dim], [0, 0])
                tally[g[dim]][0] += 1
                tally[g[dim]][1] += int(ok)
        if tally:
            out[dim] = {str(k): {"n": n, "accuracy": round(c / n, 4)}
                        for k, (n, c) in sorted(tally.items(), key=lambda kv: _sort_key(kv[0]))}
    return out


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, int) else (1, str(value))
