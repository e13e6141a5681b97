"""Faithfulness, step arithmetic and the verify filter's verdicts on hand-made and GSM8K text
(answer extraction and comparison: tests/test_answers.py)."""

from __future__ import annotations

from typing import Any

import pytest

from distill.answers import answers_match, extract_answer, gold_answer
from distill.config import VerifyConfig
from distill.filter.verify import is_faithful, verify_row, wrong_steps
from tests.test_answers import gsm8k, needs_gsm8k


def test_faithfulness_is_last_equation_against_stated_answer() -> None:
    assert is_faithful("48 / 2 = 24 in May, 48 + 24 = 72 in all. The answer is 72.") is True
    assert is_faithful("3 + 4 = 7 apples. The answer is 8.") is False
    assert is_faithful("She pays $12 * 100 = $1,200.00.\n#### 1200") is True
    assert is_faithful("Half of 3 is 3/2 = 1.5 cups. The answer is 3/2") is True
    assert is_faithful("It is obviously twelve. The answer is 12.") is None  # nothing to check
    assert is_faithful("The answer is Paris.") is None


def row(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": "r", "seed_id": "s", "question": "q?", "finish_reason": "stop"}
    return base | fields


def test_verify_row_reasons_and_scores() -> None:
    cfg = VerifyConfig()
    ok = row(response="3 + 4 = 7. The answer is 7.", answer="7", gold="7")
    assert verify_row(ok, cfg) is None
    assert ok["scores"] == {"answer_source": "phrase", "truncated": False, "verified": True,
                            "faithful": True, "arithmetic_ok": True}
    wrong = row(response="3 + 4 = 8. The answer is 8.", answer="8", gold="7")
    assert verify_row(wrong, cfg) == "wrong answer" and wrong["scores"]["verified"] is False
    cut = row(response="3 + 4 = 7. The ans", answer="7", gold="7", finish_reason="length")
    assert verify_row(cut, cfg) == "truncated (finish_reason=length)"
    assert cut["scores"]["truncated"] is True
    none = row(response="I do not know.", answer=None, gold="7")
    assert verify_row(none, cfg) == "truncated (no final answer)"
    unfaithful = row(response="3 + 4 = 7. The answer is 7.\nSo 7 * 2 = 14.\n#### 7", gold="7")
    assert verify_row(unfaithful, cfg) == "unfaithful (last equation differs from the answer)"
    assert verify_row(unfaithful, VerifyConfig(faithfulness=False)) is None


@pytest.mark.parametrize(("text", "wrong"), [
    ("In total that is 280 + 540 = 720 miles.", ["280 + 540 = 720"]),
    ("In total that is 280 + 540 = 820 miles.", []),
    ("Natalia sold 48+24 = <<48+24=72>>72 clips.", []),
    ("She pays $12 * 100 = $1,200.00.", []),
    ("1,200 + 300 = 1,600 people", ["1,200 + 300 = 1,600"]),
    ("3 x 4 = 12, then 10 - 2 - 3 = 6", ["10 - 2 - 3 = 6"]),
    ("3 + 4 * 2 = 11", []),  # precedence
    ("100 / 3 = 33.33 each", []),  # rounded to the decimals shown
    ("Each day that is 70 / 8 = 10 pages.", ["70 / 8 = 10"]),
    ("it takes 17/3 = 5 and 2/3 loads", []),  # floored
    ("2 + 3 = 5 * 4 = 20", []),  # a running chain: each result checked
    ("-5 + 3 = -2", []),
    ("The answer is 5.", None),  # nothing to check
    ("d = b * k = 4 * 12 = 48.", []),
    ("(3 + 4) * 2 = 15", None),  # part of a larger expression: left alone
    ("8 x 1 1/2 = 12 rolls", None),  # mixed number
    ("20% of 50 = 10", None),
    ("half of 10 + 4 = 9", None),
    ("100/5 = 5A/5 or 20 = A", None),  # algebra
    ("3*X - 3*6 = 77", None),
    ("from 0900-0130 = 0730 hours", None),  # clock times
])
def test_wrong_steps_recompute_plain_equations(text: str, wrong: list[str] | None) -> None:
    assert wrong_steps(text) == wrong


def test_a_wrong_step_drops_a_row_even_when_the_answer_is_right() -> None:
    text = ("First it goes 70 * 4 = 280 miles.\nThen it goes 90 * 6 = 540 miles.\n"
            "In total that is 280 + 540 = 720 miles.\nThe miles left are 970 - 720 = 150.\n"
            "The answer is 150.")  # a demo teacher sample: two slips cancel out
    r = row(response=text, gold="150")
    assert verify_row(r, VerifyConfig()) == "wrong arithmetic in a step"
    assert r["scores"]["verified"] is True and r["scores"]["wrong_step"] == "280 + 540 = 720"
    assert verify_row(row(response=text, gold="150"), VerifyConfig(arithmetic=False)) is None


@needs_gsm8k
def test_gsm8k_gold_solutions_rarely_have_a_wrong_step() -> None:
    rows = gsm8k("train", 7473) + gsm8k("test", 1319)
    flagged = [r["answer"] for r in rows if wrong_steps(r["answer"])]
    checked = sum(wrong_steps(r["answer"]) is not None for r in rows)
    assert checked / len(rows) > 0.9  # nearly every solution has a checkable equation
    # 15 of the 8,792 when written: mostly real slips in GSM8K ("2*8=24", "4+4+6=18")
    assert len(flagged) <= 0.003 * len(rows)
    assert any("Jerry took 2*8 = 24 hours" in a for a in flagged)


def test_rows_without_gold_pass_unless_gold_is_required() -> None:
    r = row(response="2 * 5 = 10. The answer is 10.", gold=None)
    assert verify_row(r, VerifyConfig()) is None and r["scores"]["verified"] is None
    assert verify_row(row(response="The answer is 10.", gold=None),
                      VerifyConfig(require_gold=True)) == "no gold answer"


def test_explicit_answer_can_be_required() -> None:
    implicit = row(response="She has 3 + 4 = 7 apples", gold="7")
    assert verify_row(dict(implicit), VerifyConfig()) is None
    assert verify_row(dict(implicit), VerifyConfig(require_explicit_answer=True)) == (
        "truncated (no final answer)")


def test_bring_your_own_row_without_answer_field_gets_one() -> None:
    r: dict[str, Any] = {"question": "q?", "response": "So the total is \\boxed{1,200}.",
                         "gold": "1200"}
    assert verify_row(r, VerifyConfig()) is None
    assert r["answer"] == "1200" and r["scores"]["verified"] is True


def test_instruction_rows_are_not_asked_for_a_final_answer() -> None:
    r = row(response="Here is a haiku about autumn leaves.", gold=None)
    assert verify_row(r, VerifyConfig(), answers_expected=False) is None
    assert r["scores"]["truncated"] is False


@needs_gsm8k
def test_gsm8k_solutions_verify_against_their_own_gold() -> None:
    rows = gsm8k("train", 300) + gsm8k("test", 100)
    for r in rows:
        gold = r["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert gold_answer(r["answer"]) == gold
        assert answers_match(r["answer"], gold), r["answer"]
        # The solution text as a teacher response: extracted, matched and (mostly) faithful.
        assert answers_match(extract_answer(r["answer"]), r["answer"])
    faithful = [is_faithful(r["answer"]) for r in rows]
    assert sum(f is True for f in faithful) / len(rows) >= 0.95
    # Someone else's gold must not match: no lenient false positives.
    shifted = [answers_match(a["answer"], b["answer"]) for a, b in zip(rows, rows[1:],
                                                                       strict=False)]
    assert sum(shifted) / len(shifted) < 0.05
