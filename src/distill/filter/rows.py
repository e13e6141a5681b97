"""Row accessors every filter shares: bring-your-own files may lack any optional field.

A generations file only needs a question and a response (or rationale, or an assistant message);
everything else (id, seed_id, gold, answer, finish_reason, ...) is used when present.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from distill.answers import extract_answer, gold_answer


def _message(row: dict[str, Any], role: str, last: bool) -> str:
    msgs = [m for m in (row.get("messages") or []) if isinstance(m, dict) and m.get("role") == role]
    if not msgs:
        return ""
    return str((msgs[-1] if last else msgs[0]).get("content") or "")


def question_of(row: dict[str, Any]) -> str:
    return str(row.get("question") or _message(row, "user", last=False) or "")


def response_of(row: dict[str, Any]) -> str:
    """The text a student learns from: the visible rationale, else the raw response."""
    text = row.get("rationale") or row.get("response") or _message(row, "assistant", last=True)
    return str(text or "")


def seed_of(row: dict[str, Any]) -> str:
    """Samples of one prompt share a seed: its id, else its normalized question."""
    seed = row.get("seed_id")
    return str(seed) if seed not in (None, "") else "q:" + normalize_text(question_of(row))


def answer_of(row: dict[str, Any]) -> str | None:
    """The row's final answer: the generation's `answer` field, else extracted from its text."""
    answer = row.get("answer")
    if answer not in (None, ""):
        return gold_answer(answer)
    return extract_answer(response_of(row))


def has_gold(row: dict[str, Any]) -> bool:
    return row.get("gold") not in (None, "")


def normalize_text(text: str) -> str:
    """Unicode-, case- and whitespace-insensitive form of a text (punctuation kept)."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    return re.sub(r"\s+", " ", text).strip()


def words(text: str) -> list[str]:
    """Normalized word tokens (punctuation dropped): the unit of n-gram filters."""
    return re.findall(r"\w+", unicodedata.normalize("NFKC", text or "").casefold())


def quality_key(row: dict[str, Any]) -> tuple[float, float, float, float]:
    """Sort key, best first, for choosing the row a cluster or a seed keeps:
    verified, then judge score, then agreement, then the shorter response."""
    scores = row.get("scores") or {}
    verified = {True: 0.0, None: 1.0, False: 2.0}.get(scores.get("verified"), 1.0)
    judge = scores.get("judge")
    agreement = scores.get("agreement")
    return (
        verified,
        -float(judge) if isinstance(judge, int | float) else 0.0,
        -float(agreement) if isinstance(agreement, int | float) else 0.0,
        float(len(response_of(row))),
    )
