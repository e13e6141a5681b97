"""Split a teacher's response into reasoning, rationale and final answer.

Reasoning models put their trace in `<think>...</think>` (or the server returns it separately as
`reasoning`); the visible text after it is the rationale a student learns from. A response cut
inside its think block has no visible text at all: the rationale then falls back to the trace and
the answer is whatever the trace states (often None, which the verify filter flags as truncated).
"""

from __future__ import annotations

import re

from distill.filter.verify import extract_answer

_THINK = re.compile(r"<think>(.*?)</think>", re.S | re.I)
_OPEN = re.compile(r"<think>", re.I)
_CLOSE = re.compile(r"</think>", re.I)


def split_think(text: str) -> tuple[str | None, str]:
    """Separate `<think>...</think>` blocks (reasoning) from the visible text."""
    blocks = _THINK.findall(text)
    rest = _THINK.sub("", text)
    if _CLOSE.search(rest):  # opening tag eaten by the chat template: "...trace</think>answer"
        head, tail = _CLOSE.split(rest, maxsplit=1)
        blocks.insert(0, _OPEN.sub("", head))
        rest = tail
    open_tag = _OPEN.search(rest)
    if open_tag:  # cut off while thinking: everything after the tag is trace
        blocks.append(rest[open_tag.end() :])
        rest = rest[: open_tag.start()]
    reasoning = "\n".join(b.strip() for b in blocks if b.strip()) or None
    return reasoning, rest.strip() if blocks or open_tag else text


def parse_response(text: str, reasoning: str | None = None) -> dict[str, str | None]:
    """Return {reasoning, rationale, answer}.

    rationale: the visible text (think blocks removed), or the reasoning when nothing is visible.
    answer: the cleaned final answer of the visible text, else of the reasoning, else None.
    """
    think, visible = split_think(text or "")
    if reasoning and think:
        reasoning = f"{reasoning.strip()}\n{think}"
    reasoning = reasoning or think
    answer = extract_answer(visible) or (extract_answer(reasoning) if reasoning else None)
    rationale = visible.strip() or (reasoning or "").strip()
    return {"reasoning": reasoning, "rationale": rationale, "answer": answer}
