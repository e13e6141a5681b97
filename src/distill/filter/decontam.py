"""Decontamination: drop rows that share a word n-gram with an item of an evaluation set.

Texts are compared normalized (unicode form, case, punctuation dropped), so "How many apples?"
and "how many APPLES" are one n-gram. An evaluation item shorter than `ngram` words is matched
whole. Each hit is reported with the item it matched:
row["scores"]["contamination"] = {"eval_file", "eval_index", "ngram", "field"}.

n = 10 (`python benchmarks/dedup.py quality`) flags 0.15% of GSM8K train against GSM8K test
(template siblings such as "A train travels 270 miles in 3 hours. At the same rate..." and a few
stock phrases) and catches 99.4% of lightly edited test questions; 8 flags 1.3% (stock phrases
such as "what is the sum of the ages of"), 13 catches 97%.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.config import ConfigError, DecontamConfig
from distill.filter.rows import question_of, response_of, words
from distill.records import read_jsonl

_FALLBACK_FIELDS = ("question", "problem", "prompt", "input", "instruction", "text")


@dataclass
class EvalIndex:
    """Every n-gram of every evaluation item -> (file, index) of the first item holding it."""

    n: int
    grams: dict[str, tuple[str, int]] = field(default_factory=dict)
    short: dict[int, dict[str, tuple[str, int]]] = field(default_factory=dict)
    """Items shorter than n words, by their length: matched as a whole."""
    items: int = 0

    def add(self, text: str, where: tuple[str, int]) -> None:
        toks = words(text)
        if not toks:
            return
        self.items += 1
        if len(toks) < self.n:
            self.short.setdefault(len(toks), {}).setdefault(" ".join(toks), where)
            return
        for i in range(len(toks) - self.n + 1):
            self.grams.setdefault(" ".join(toks[i : i + self.n]), where)

    def find(self, text: str) -> tuple[str, tuple[str, int]] | None:
        """The first n-gram of `text` found in an evaluation item, and that item."""
        toks = words(text)
        for size, table in [(self.n, self.grams), *self.short.items()]:
            for i in range(len(toks) - size + 1):
                gram = " ".join(toks[i : i + size])
                hit = table.get(gram)
                if hit is not None:
                    return gram, hit
        return None


def _read_eval(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        rows = data if isinstance(data, list) else data.get("data", [])
    else:
        rows = read_jsonl(path)
    return [r for r in rows if isinstance(r, dict)]


def build_index(paths: list[str], text_field: str, n: int,
                resolve: Callable[[str], Path] = Path) -> EvalIndex:
    index = EvalIndex(n)
    for name in paths:
        path = resolve(name)
        if not path.is_file():
            raise ConfigError(f"filter.decontaminate.against: file not found: {name}")
        for i, item in enumerate(_read_eval(path)):
            key = text_field if text_field in item else next(
                (f for f in _FALLBACK_FIELDS if f in item), None)
            if key is not None and item[key]:
                index.add(str(item[key]), (name, i))
    return index


def decontam_reasons(rows: list[dict[str, Any]], cfg: DecontamConfig,
                     resolve: Callable[[str], Path] = Path) -> list[str | None]:
    """Score contaminated rows (scores["contamination"]) and return drop reasons."""
    if not cfg.against:
        return [None] * len(rows)
    index = build_index(cfg.against, cfg.field, cfg.ngram, resolve)
    reasons: list[str | None] = []
    for row in rows:
        fields = [("question", question_of(row))]
        if cfg.check_responses:
            fields.append(("response", response_of(row)))
        reason = None
        for name, text in fields:
            hit = index.find(text)
            if hit:
                gram, (eval_file, eval_index) = hit
                row.setdefault("scores", {})["contamination"] = {
                    "eval_file": eval_file, "eval_index": eval_index, "ngram": gram, "field": name}
                reason = f"contaminated ({Path(eval_file).name})"
                break
        reasons.append(reason)
    return reasons
