"""Final-answer extraction, gold comparison and faithfulness on hand-made and GSM8K text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distill.config import VerifyConfig
from distill.filter.verify import (
    answers_match,
    extract_answer,
    gold_answer,
    is_faithful,
    verify_row,
    wrong_steps,
)

ROOT = Path(__file__).resolve().parents[1]
GSM8K = next((p for p in (ROOT / "data" / "gsm8k", Path("/work/shared/data/gsm8k"))
              if (p / "train.jsonl").exists()), None)
needs_gsm8k = pytest.mark.skipif(GSM8K is None, reason="GSM8K jsonl files not found")


def gsm8k(split: str, n: int) -> list[dict[str, str]]:
    assert GSM8K is not None
    with open(GSM8K / f"{split}.jsonl") as fh:
        return [json.loads(line) for _, line in zip(range(n), fh, strict=False)]


@pytest.mark.parametrize(("text", "answer"), [
    ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("So the result is \\boxed{\\frac{3}{4}}.", "3/4"),
    ("\\boxed{\\dfrac{7}{2}}", "7/2"),
    ("Nested: \\boxed{\\frac{1}{\\sqrt{2}}} done", "\\frac{1}{\\sqrt{2}}"),
    ("\\boxed{12 \\text{ apples}}", "12"),
    ("The answer is 42. She was happy with that.", "42"),
    ("The final answer is: 42", "42"),
    ("Answer: $1,200.00", "1200"),
    ("The answer is **42**", "42"),
    ("So she has **42** apples in total.", "42"),
    ("The answer is 45%.", "45%"),
    ("The answer is 3/4 of a cup.", "3/4"),
    ("The answer is 1 1/2 cups.", "3/2"),
    ("The answer is 12 apples.", "12"),
    ("She ran 2 + 3 = 5 km. The answer is 5 km", "5"),
    ("The answer is (B).", "B"),
    ("Final answer: B) 12 apples", "B"),
    ("So the correct option is (c)", "C"),
    ("Comparing the choices...\n(D) 15", "D"),
    ("The answer is x = 5", "5"),
    ("The answer is five.", "5"),
    ("The answer is -.5", "-0.5"),
    ("The answer is 1,000,000.", "1000000"),
    ("The answer is x^2 + 1.", "x^2 + 1"),
    ("The answer is Paris.", "Paris"),
    ("The answer is B. Option A gives 12, which is too many.", "B"),
    ("Answer: First we add them. 3 + 4 = 7", "7"),
    ("He pays 3 * 4 = 12 dollars, then 12 + 0.5 = 12.5 in all", "12.5"),
    ("Answer: Let's compute. 3 + 4 = 7", "7"),  # "Answer:" as a heading, not an answer
    ("**Step 1: add 5 + 3**\n\nTotal 8", "8"),
    ("The answer is 7.\nWait, I made a mistake. The answer is 8.", "8"),
    ("I am not sure how to do this.", None),
    ("", None),
])
def test_extract_answer_from_real_teacher_text(text: str, answer: str | None) -> None:
    assert extract_answer(text) == answer


@pytest.mark.parametrize(("pred", "gold"), [
    ("1200", "$1,200.00"),
    ("1,200", "1200"),
    ("0.75", "3/4"),
    ("\\frac{3}{4}", "0.75"),
    ("45%", "45"),
    ("45%", "0.45"),
    ("B", "(B)"),
    ("b", "B"),
    ("x^2+1", "1+x^2"),
    ("\\sqrt{2}", "2^{1/2}"),
    ("The answer is 18.", "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 18"),
    ("18.0", 18),
    ("Paris", "paris"),
])
def test_answers_match(pred: str, gold: str) -> None:
    assert answers_match(pred, gold)


@pytest.mark.parametrize(("pred", "gold"), [
    ("17", "18"), ("1.2", "12"), ("B", "C"), ("3/4", "4/3"), ("45%", "4.5"), ("x^2", "x^3"),
    (None, "1"), ("1", None), ("", "1"),
])
def test_answers_that_differ_do_not_match(pred: str | None, gold: str | None) -> None:
    assert not answers_match(pred, gold)


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


@needs_gsm8k
def test_gsm8k_solutions_rewritten_in_teacher_styles_still_verify() -> None:
    styles = [
        "{body}\nThe answer is {ans}.",
        "{body}\n\nTherefore, the final answer is $\\boxed{{{ans}}}$.",
        "{body}\n**Answer:** {ans} dollars. Let me know if you need anything else!",
        "<think>{body}</think>\nSo the result is **{ans}**.",
    ]
    from distill.generate.parse import parse_response

    for i, r in enumerate(gsm8k("test", 200)):
        body, ans = (part.strip() for part in r["answer"].rsplit("####", 1))
        text = styles[i % len(styles)].format(body=body, ans=ans)
        parsed = parse_response(text)
        assert answers_match(parsed["answer"], r["answer"]), text
