"""Cheap response checks: empty, length bounds, degenerate repetition, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.config import HeuristicsConfig
from distill.filter.heuristics import heuristic_reason, is_refusal, repeat_ratio

GSM8K = next((p for p in (Path(__file__).resolve().parents[1] / "data" / "gsm8k",
                          Path("/work/shared/data/gsm8k")) if (p / "train.jsonl").exists()), None)


def reason(response: str, **cfg: object) -> str | None:
    return heuristic_reason({"question": "q", "response": response}, HeuristicsConfig(**cfg))


def test_empty_and_length_bounds() -> None:
    assert reason("") == "empty response"
    assert reason("   \n ") == "empty response"
    assert reason("The answer is 4.", min_chars=20) == "too short"
    assert reason("word " * 100, max_chars=50) == "too long"
    assert reason("Two plus two is four. The answer is 4.") is None


def test_repetition_loops_are_caught_and_prose_is_not() -> None:
    loop = "First, 3 + 4 = 7. " + "So the total is 7 and then we add. " * 40
    assert repeat_ratio(loop, 4) > 0.8
    assert reason(loop) == "repetitive"
    prose = ("Natalia sold 48 clips in April. In May she sold half as many, which is 24. "
             "Altogether she sold 48 + 24 = 72 clips. The answer is 72.")
    assert repeat_ratio(prose, 4) < 0.1
    assert repeat_ratio("too short", 4) == 0.0


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that request.",
    "I’m sorry, I cannot assist with this.",
    "As an AI language model, I cannot provide that.",
    "Sorry, but I won't do that.",
    "Unfortunately, I am unable to answer this question.",
    "I cannot help with that.",
])
def test_refusals(text: str) -> None:
    assert is_refusal(text)
    assert reason(text) == "refusal"
    assert reason(text, drop_refusals=False) is None


@pytest.mark.parametrize("text", [
    "Sorry to hear the train was late: it arrives at 5 + 2 = 7 pm. The answer is 7.",
    "She cannot buy more than 3 apples, so the answer is 3.",
    "Tom says 'I'm sorry' to Jerry 3 times a day, so 3 * 7 = 21 times a week.",
])
def test_answers_that_merely_mention_sorry_or_cannot_are_kept(text: str) -> None:
    assert not is_refusal(text)


@pytest.mark.skipif(GSM8K is None, reason="GSM8K jsonl files not found")
def test_real_solutions_pass_the_default_heuristics() -> None:
    assert GSM8K is not None
    with open(GSM8K / "train.jsonl") as fh:
        answers = [json.loads(line)["answer"] for _, line in zip(range(500), fh, strict=False)]
    dropped = [a for a in answers if reason(a) is not None]
    assert dropped == []
