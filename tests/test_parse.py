"""Splitting teacher text into reasoning, rationale and final answer."""

from __future__ import annotations

from distill.generate.parse import parse_response, split_think


def test_think_block_is_reasoning_and_the_rest_is_the_rationale() -> None:
    out = parse_response("<think>3 + 4 is 7, check: yes</think>\nTom has 3 + 4 = 7 apples.\n"
                         "The answer is 7.")
    assert out["reasoning"] == "3 + 4 is 7, check: yes"
    assert out["rationale"].startswith("Tom has") and "<think>" not in out["rationale"]
    assert out["answer"] == "7"


def test_opening_tag_eaten_by_the_chat_template() -> None:
    reasoning, visible = split_think("let me think... 12</think>\n\\boxed{12}")
    assert reasoning == "let me think... 12"
    assert visible == "\\boxed{12}"
    assert parse_response("let me think</think>The answer is 12")["answer"] == "12"


def test_response_cut_inside_its_think_block_has_no_visible_answer() -> None:
    out = parse_response("<think>First, 48 / 2 = 24. Then 48 + 24 = ")
    assert out["reasoning"] == "First, 48 / 2 = 24. Then 48 + 24 ="
    assert out["rationale"] == out["reasoning"]  # nothing visible: the trace is all there is
    assert out["answer"] == "24"  # what the trace states; verify flags the cut via finish_reason


def test_server_side_reasoning_is_kept_and_answer_comes_from_the_visible_text() -> None:
    out = parse_response("So the total is **$1,200.00**.", reasoning="hidden trace 999")
    assert out["reasoning"] == "hidden trace 999"
    assert out["answer"] == "1200"


def test_plain_text_without_think_tags_passes_through() -> None:
    text = "Natalia sold 48/2 = 24 clips in May.\n#### 72"
    assert split_think(text) == (None, text)
    assert parse_response(text) == {"reasoning": None, "rationale": text, "answer": "72"}


def test_empty_and_answerless_responses() -> None:
    assert parse_response("") == {"reasoning": None, "rationale": "", "answer": None}
    assert parse_response("I am not sure how to solve this.")["answer"] is None
