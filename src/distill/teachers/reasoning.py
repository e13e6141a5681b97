"""Normalize where a teacher puts its reasoning: a separate field, or `<think>` blocks in the text.

Servers differ: DeepSeek and vLLM's reasoning parsers return `reasoning_content` (newer vLLM:
`reasoning`); a raw model emits `<think>...</think>` inline; chat templates that open the think
block in the prompt leave only the closing tag in the output. All of them end up as
(reasoning, text) so the rest of the pipeline never looks for tags. The tag rules themselves
(`split_think`) live in `distill.answers`, shared with `parse_response`.
"""

from __future__ import annotations

from typing import Any

from distill.answers import join_reasoning, split_think


def normalize_message(message: dict[str, Any]) -> tuple[str | None, str]:
    """(reasoning, text) from an OpenAI-style assistant message dict: the separate reasoning
    field first, then any inline think blocks."""
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    field = message.get("reasoning_content")
    if not isinstance(field, str) or not field:
        field = message.get("reasoning")
    separate = field.strip() if isinstance(field, str) and field.strip() else None
    inline, text = split_think(text)
    return join_reasoning(separate, inline), text
