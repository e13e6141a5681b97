"""Tiny project folders for pipeline tests against a loopback teacher."""

from __future__ import annotations

from pathlib import Path


def write_sum_project(root: Path, n: int) -> None:
    """`root/seeds.jsonl` with `n` "What is i + 1?" questions (gold i + 1) and a bare prompt
    template `root/p.j2`."""
    (root / "seeds.jsonl").write_text("".join(
        f'{{"id": "s{i}", "question": "What is {i} + 1?", "answer": "{i + 1}"}}\n'
        for i in range(n)))
    (root / "p.j2").write_text("{{ question }}")
