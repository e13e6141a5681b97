"""Reading a self-instruct teacher's replies: the instructions a proposal lists, the rewrite an
evolution returns, and whether an instruction is usable at all.

Models answer in many shapes (numbered lists, "Task 3:", bold markers, bullets, a JSON list,
preambles and closing remarks, an answer under each task); these functions take the tasks out of
all of them, deterministically, so a rerun from the cache builds the same pool.
"""

from __future__ import annotations

import json
import re

from distill.answers import split_think
from distill.config import SelfInstructConfig
from distill.filter.rows import normalize_text, words

# Tasks a text-only student cannot do (self-instruct's filter, narrowed to unambiguous words).
BLOCKED_WORDS = frozenset({
    "image", "images", "picture", "pictures", "photo", "photos", "photograph", "video", "videos",
    "audio", "recording", "diagram", "flowchart", "draw", "drawing", "sketch", "screenshot",
})
# Labels a model puts before an item or a rewrite ("Task 3:", "**Instruction:**", ...).
_LABEL = re.compile(
    r"^\s*(?:#+\s*)?(?:\*\*|__)?\s*(?:new\s+|rewritten\s+|evolved\s+|the\s+)?"
    r"(?:#?\s*(?:task|instruction|prompt|question)\s*#?)\s*\d*\s*(?:\*\*|__)?\s*(?:[:.)]|\s-\s)\s*"
    r"(?:\*\*|__)?\s*", re.I)
_ITEM = re.compile(
    r"^\s*(?:#+\s*)?(?:\*\*)?\s*(?:(?:task|instruction|prompt|question)\s*)?"
    r"(?:\(?\d{1,3}[.):\]]|\d{1,3}\s*-\s)\s*(?:\*\*)?\s*(?=\S)", re.I)
_BULLET = re.compile(r"^\s*[-*•]\s+(?=\S)")
_OUTPUT = re.compile(r"^\s*(?:\*\*)?\s*(?:output|answer|response|solution)\s*(?:\*\*)?\s*:",
                     re.I | re.M)
_INPUT = re.compile(r"^\s*(?:\*\*)?\s*input\s*(?:\*\*)?\s*:\s*", re.I | re.M)
_CLOSER = re.compile(r"\n\s*\n\s*(?:i hope|hope th|let me know|feel free|note:|enjoy|happy to"
                     r"|these (?:tasks|instructions)|each (?:task|of these))", re.I)
_LEAKS = ("#given prompt#", "#rewritten prompt#", "#the given prompt#", "given instruction:",
          "rewritten instruction:", "method:")


def _strip_markup(text: str) -> str:
    text = text.strip().strip("`").strip()
    text = re.sub(r"^(?:\*\*|__)(.+?)(?:\*\*|__)(?=\s|$)", r"\1", text, flags=re.S)
    text = text.replace("**", "")
    for _ in range(2):
        text = _LABEL.sub("", text, count=1).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'“”":
        text = text[1:-1].strip()
    if text[:1] in "“\"" and text[-1:] in "”\"":
        text = text[1:-1].strip()
    return text


def _clean_item(text: str) -> str:
    """One proposed task: drop any answer the model added, fold an `Input:` into the text."""
    m = _OUTPUT.search(text)
    if m and m.start() > 0:
        text = text[: m.start()]
    text = _INPUT.sub("\n", text)
    text = _strip_markup(text)
    lines = [ln.rstrip() for ln in text.splitlines()]
    return "\n".join(lines).strip()


def _from_json(text: str) -> list[str] | None:
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        return None
    try:
        data = json.loads(text[start : end + 1])
    except ValueError:
        return None
    if not isinstance(data, list):
        return None
    items = []
    for x in data:
        if isinstance(x, str):
            items.append(x)
        elif isinstance(x, dict):
            inst = x.get("instruction") or x.get("task") or x.get("prompt")
            if isinstance(inst, str):
                extra = x.get("input")
                items.append(f"{inst}\n\n{extra}" if isinstance(extra, str) and extra else inst)
    return items


def parse_instructions(text: str | None) -> list[str]:
    """The instructions in a proposal reply: a numbered list ("1." "2)" "Task 3:" "**4.**"),
    bullets, or a JSON list; an item runs until the next marker, so multi-line inputs survive.
    A reply with no markers at all is split on blank lines. Preambles are dropped."""
    if not text:
        return []
    _, visible = split_think(text)
    items: list[str] = []
    current: list[str] | None = None
    for line in visible.splitlines():
        m = _ITEM.match(line) or _BULLET.match(line)
        if m:
            if current is not None:
                items.append("\n".join(current))
            current = [line[m.end() :]]
        elif current is not None:
            current.append(line)
    if current is not None:
        items.append("\n".join(current))
    if items:  # a closing remark after the list sticks to the last item: cut it off
        items[-1] = _CLOSER.split(items[-1], maxsplit=1)[0]
    if not items:
        items = _from_json(visible) or [p for p in re.split(r"\n\s*\n", visible) if p.strip()]
    out, seen = [], set()
    for item in items:
        clean = _clean_item(item)
        key = normalize_text(clean)
        if clean and key not in seen:
            seen.add(key)
            out.append(clean)
    return out


def instruction_problem(text: str, si: SelfInstructConfig) -> str | None:
    """Why a proposed instruction is unusable, or None."""
    toks = words(text)
    if len(toks) < si.min_words:
        return "too short"
    if len(toks) > si.max_words:
        return "too long"
    if not text[:1].isalnum() and text[:1] not in "\"'(¿¡":
        return "starts with punctuation"
    if text.rstrip().endswith(":") and "\n" not in text.strip():
        return "a heading, not a task"
    if BLOCKED_WORDS.intersection(toks):
        return "needs non-text modality"
    return None


def parse_evolved(text: str | None, parent: str, si: SelfInstructConfig) -> tuple[str | None, str]:
    """(the rewritten instruction, "ok") or (None, why the evolution failed)."""
    if not text:
        return None, "empty"
    _, visible = split_think(text)
    lines = visible.strip().splitlines()
    # "Here is the rewritten instruction:" on its own line before the rewrite.
    while lines and lines[0].rstrip().endswith(":") and len(lines) > 1 and len(
            words(lines[0])) <= 8:
        lines = lines[1:]
    evolved = _strip_markup("\n".join(lines))  # a leading "Rewritten instruction:" is fine
    if not evolved:
        return None, "empty"
    low = evolved.casefold()
    if any(leak in low for leak in _LEAKS):
        return None, "copied the rewrite instructions"
    if normalize_text(evolved) == normalize_text(parent):
        return None, "unchanged"
    if low.startswith(("sorry", "i'm sorry", "i am sorry", "i cannot", "i can't")):
        return None, "refusal"
    problem = instruction_problem(evolved, si.model_copy(update={"max_words": si.max_words * 2}))
    return (None, problem) if problem else (evolved, "ok")
