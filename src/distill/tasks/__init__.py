"""Procedural task generators: seeded, deterministic, with train/test splits that never overlap.

    make_task("arithmetic", "train", n=1000, seed=0) -> [{"id", "question", "answer", ...}, ...]
"""

from __future__ import annotations

from collections.abc import Callable

from distill.tasks.arithmetic import (
    COT_SUFFIX,
    check_solution,
    make_arithmetic,
    parse_answer,
    prompt_text,
)

TASKS: dict[str, Callable[[str, int, int], list[dict]]] = {
    "arithmetic": make_arithmetic,
}


def make_task(name: str, split: str = "train", n: int = 100, seed: int = 0) -> list[dict]:
    """Rows {id, question, answer, solution, source, steps, ...} of task `name`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name](split, n, seed)


__all__ = ["COT_SUFFIX", "TASKS", "check_solution", "make_task", "parse_answer", "prompt_text"]
