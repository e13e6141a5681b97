"""Cheap checks on the response text: empty, too short or long, degenerate repetition, refusal."""

from __future__ import annotations

import re
from typing import Any

from distill.config import HeuristicsConfig
from distill.filter.rows import response_of, words

# A refusal opens the response; "As an AI language model" and "I can't help with" may follow a
# short preamble, so they are searched in the first few hundred characters.
_REFUSAL_OPENING = re.compile(
    r"^\W*(?:i'?m\s+sorry|i\s+am\s+sorry|sorry,?\s+(?:but\s+)?i|i\s+apologi[sz]e,?\s+but"
    r"|unfortunately,?\s+i\s+(?:can(?:no|')?t|am\s+unable))",
    re.I,
)
_REFUSAL_ANYWHERE = re.compile(
    r"as\s+an\s+ai(?:\s+language)?\s+model|i\s+(?:can(?:no|')?t|cannot|won'?t|am\s+unable\s+to"
    r"|am\s+not\s+able\s+to|must\s+decline\s+to)\s+(?:help|assist|answer|provide|comply|fulfil"
    r"|do\s+that|complete\s+(?:this|that))",
    re.I,
)


def repeat_ratio(text: str, n: int) -> float:
    """Share of word n-grams that repeat an earlier one: ~0 for prose, near 1 for a loop."""
    toks = words(text)
    grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def is_refusal(text: str) -> bool:
    head = text.strip()[:300].replace("’", "'")
    return bool(_REFUSAL_OPENING.search(head) or _REFUSAL_ANYWHERE.search(head))


def heuristic_reason(row: dict[str, Any], cfg: HeuristicsConfig) -> str | None:
    """Score (repeat_ratio) and return a drop reason or None."""
    text = response_of(row)
    scores = row.setdefault("scores", {})
    if not text.strip():
        return "empty response"
    ratio = repeat_ratio(text, cfg.repeat_ngram)
    scores["repeat_ratio"] = round(ratio, 4)
    if len(text) < cfg.min_chars:
        return "too short"
    if len(text) > cfg.max_chars:
        return "too long"
    if ratio > cfg.max_repeat_ratio:
        return "repetitive"
    if cfg.drop_refusals and is_refusal(text):
        return "refusal"
    return None
