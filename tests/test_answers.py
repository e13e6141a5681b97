"""Final-answer extraction, comparison with gold, and grading (`distill.answers`), on hand-made
and GSM8K text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.answers import answers_match, extract_answer, parse_response, score

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


@needs_gsm8k
def test_gsm8k_solutions_rewritten_in_teacher_styles_still_verify() -> None:
    styles = [
        "{body}\nThe answer is {ans}.",
        "{body}\n\nTherefore, the final answer is $\\boxed{{{ans}}}$.",
        "{body}\n**Answer:** {ans} dollars. Let me know if you need anything else!",
        "<think>{body}</think>\nSo the result is **{ans}**.",
    ]
    for i, r in enumerate(gsm8k("test", 200)):
        body, ans = (part.strip() for part in r["answer"].rsplit("####", 1))
        text = styles[i % len(styles)].format(body=body, ans=ans)
        parsed = parse_response(text)
        assert answers_match(parsed["answer"], r["answer"]), text


@pytest.mark.parametrize(("completion", "gold", "reasoning", "right"), [
    ("<think>16 - 3 - 4 = 9 eggs, 9 * 2 = 18</think>She makes **$18**.", "#### 18", None, True),
    ("<think>16 - 3 - 4 = 9 eggs, 9 * 2 = 18</think>She makes **$17**.", "18", None, False),
    ("She makes $18 every day.", 18, None, True),
    ("", "18", "9 * 2 = 18. The answer is 18.", True),  # nothing visible: the trace answers
    ("The answer is 18.", "18", "I first thought 17.", True),  # the visible text wins
    ("The answer is 17.", "18", "The answer is 18.", False),
    ("I cannot tell.", "18", None, False),
    (None, "18", None, False),
    ("The answer is 18.", None, None, False),
])
def test_score_grades_the_final_answer_of_a_completion(completion: str | None, gold: object,
                                                       reasoning: str | None, right: bool
                                                       ) -> None:
    assert score(completion, gold, reasoning=reasoning) is right


@needs_gsm8k
def test_score_is_the_answer_parse_response_finds_matched_against_gold() -> None:
    """The contract evaluate and the dev curves rely on: score(text, gold) grades exactly the
    `prediction` the evaluate stage records for that text."""
    rows = gsm8k("test", 100)
    for r, other in zip(rows, rows[1:] + rows[:1], strict=True):
        text = f"<think>{r['answer']}</think>So the answer is **{r['answer'].rsplit('#', 1)[1]}**"
        for gold in (r["answer"], other["answer"]):
            pred = parse_response(text)["answer"]
            assert score(text, gold) == answers_match(pred, gold)
        assert score(text, r["answer"]) and not score(text, "-1")
