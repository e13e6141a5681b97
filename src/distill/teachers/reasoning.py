"""Normalize where a teacher puts its reasoning: a separate field, or `<think>` blocks in the text.

Servers differ: DeepSeek and vLLM's reasoning parsers return `reasoning_content` (newer vLLM:
`reasoning`); a raw model emits `<think>...</think>` inline; chat templates that open the think
block in the prompt leave only the closing tag in the output. All of them end up as
(reasoning, text) so the rest of the pipeline never looks for tags.
"""

from __future__ import annotations

import re
from typing import Any

OPEN, CLOSE = "<think>", "</think>"
_BLOCK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def split_think(content: str) -> tuple[str | None, str]:
    """Return (reasoning or None, the rest of the text) for one completion's content."""
    if OPEN not in content and CLOSE not in content:
        return None, content
    parts: list[str] = []
    rest = content
    # Output that starts inside a think block the template opened: "...</think>answer".
    head, sep, tail = rest.partition(CLOSE)
    if sep and OPEN not in head:
        parts.append(head)
        rest = tail
    parts += _BLOCK.findall(rest)
    rest = _BLOCK.sub("", rest)
    # A think block cut off by max_tokens never closes: all of it is reasoning.
    if OPEN in rest:
        rest, _, unclosed = rest.partition(OPEN)
        parts.append(unclosed)
    rest = rest.replace(CLOSE, "")
    reasoning = "\n\n".join(p.strip() for p in parts if p.strip())
    return (reasoning or None), rest.strip()


def normalize_message(message: dict[str, Any]) -> tuple[str | None, str]:
    """(reasoning, text) from an OpenAI-style assistant message dict."""
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    field = message.get("reasoning_content")
    if not isinstance(field, str) or not field:
        field = message.get("reasoning")
    separate = field.strip() if isinstance(field, str) and field.strip() else None
    inline, text = split_think(text)
    if separate and inline:
        return f"{separate}\n\n{inline}", text
    return separate or inline, text
