"""Splitting teacher text into reasoning, rationale and final answer (`distill.answers`)."""

from __future__ import annotations

import pytest

from distill.answers import parse_response, split_think
from distill.teachers.reasoning import normalize_message


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
    assert split_think("  padded\n") == (None, "  padded\n")  # untouched, not even stripped
    assert parse_response(text) == {"reasoning": None, "rationale": text, "answer": "72"}


def test_empty_and_answerless_responses() -> None:
    assert parse_response("") == {"reasoning": None, "rationale": "", "answer": None}
    assert parse_response(None) == {"reasoning": None, "rationale": "", "answer": None}
    assert parse_response("I am not sure how to solve this.")["answer"] is None


# One split_think for every backend (it used to be two that disagreed) ---------------------------


@pytest.mark.parametrize(("text", "reasoning", "visible"), [
    ("<THINK>6*7</THINK>\n42", "6*7", "42"),  # tag case varies across models and templates
    ("<Think>6*7</Think>42", "6*7", "42"),
    ("6*7</THINK>42", "6*7", "42"),
    ("<think>a</think>x<think>b</think>y", "a\n\nb", "xy"),  # blocks stay separate paragraphs
    ("<think>a</think><think>cut off", "a\n\ncut off", ""),
    ("x</think>y<think>z</think>w", "x\n\nz", "yw"),
    # A stray closing tag after a block: what precedes it was thinking too, kept in text order.
    ("<think>a</think>b</think>c", "a\n\nb", "c"),
    ("<think>a<think>b</think>c", "a\n\nb", "c"),  # no tag is left inside the reasoning
    ("<think></think>\n\n42", None, "42"),  # an empty block (thinking switched off)
    ("Hello <think>x</think> world", "x", "Hello  world"),
])
def test_split_think_rules(text: str, reasoning: str | None, visible: str) -> None:
    assert split_think(text) == (reasoning, visible)


def test_server_reasoning_and_inline_blocks_join_alike_on_every_path() -> None:
    """The OpenAI-compatible teacher (`normalize_message`) and `parse_response` (files, local
    backends) give the same reasoning for the same completion."""
    text = "<THINK>b</THINK>The answer is 42"
    parsed = parse_response(text, reasoning="a")
    assert parsed["reasoning"] == "a\n\nb"
    assert normalize_message({"content": text, "reasoning_content": "a"}) == ("a\n\nb",
                                                                              "The answer is 42")
    assert parsed["answer"] == "42" and parsed["rationale"] == "The answer is 42"


def test_block_boundaries_are_paragraph_boundaries_for_the_answer() -> None:
    """With nothing visible the answer comes from the trace; a bold number in an earlier block
    is not in the last paragraph, the last block's own statement wins."""
    out = parse_response("<think>Maybe **12**?</think><think>No: 5 + 8 = 13.")
    assert out["reasoning"] == "Maybe **12**?\n\nNo: 5 + 8 = 13."
    assert out["answer"] == "13"
