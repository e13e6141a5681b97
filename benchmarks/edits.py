"""Seeded light edits of a question: the near-copies that near-dedup and decontamination must catch.

A light edit leaves the problem the same problem. One copy gets 1-3 edits, each one of:

    drop     delete a word
    insert   insert a filler word ("the", "just", "really", "exactly", "extra", ...)
    recase   re-case 1-3 words (UPPER, lower or Title), or the whole text
    punct    remove or change the punctuation after a word, add a comma, drop an apostrophe
    swap     swap two adjacent words

Number tokens (any whitespace-separated token holding a digit: "16", "$80,000", "2.5") are never
dropped, moved, re-cased or changed inside; only punctuation trailing them may change. Changing a
number makes a different problem with a different answer: that is a distinct question (a template
sibling, like GSM8K's own train/test pairs), not a copy, so `renumber` is kept apart as the
negative. Whitespace is normalized to single spaces (every filter ignores it anyway).

    from edits import light_edit
    light_edit("Tom has 3 apples. How many now?", random.Random(0))
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

KINDS = ("drop", "insert", "recase", "punct", "swap")
FILLERS = ("the", "a", "just", "really", "also", "then", "now", "all", "very", "still", "so",
           "only", "some", "that", "exactly", "actually", "new", "extra", "other", "whole",
           "usually", "about", "here", "there", "together")
_TRAILING = re.compile(r"[.,;:!?]+$")
_MARKS = (".", ",", ";", "!", "?", ":")
_APOSTROPHE = re.compile(r"['\u2019]")


@dataclass(frozen=True)
class Edited:
    text: str
    ops: tuple[str, ...]


def is_number(token: str) -> bool:
    return any(c.isdigit() for c in token)


def _trailing(token: str) -> str:
    """The punctuation run that ends a token ("" when none)."""
    match = _TRAILING.search(token)
    return match.group() if match else ""


def _plain(tokens: list[str]) -> list[int]:
    return [i for i, t in enumerate(tokens) if not is_number(t)]


def drop_word(tokens: list[str], rng: random.Random) -> bool:
    plain = _plain(tokens)
    if len(tokens) < 4 or not plain:
        return False
    del tokens[rng.choice(plain)]
    return True


def insert_word(tokens: list[str], rng: random.Random) -> bool:
    tokens.insert(rng.randint(0, len(tokens)), rng.choice(FILLERS))
    return True


def recase(tokens: list[str], rng: random.Random) -> bool:
    """UPPER, lower or Title 1-3 words that it changes, or (one time in five) the whole text."""
    change = rng.choice((str.upper, str.lower, str.title))
    if rng.random() < 0.2:
        before = list(tokens)
        tokens[:] = [change(t) for t in tokens]
        return tokens != before
    able = [i for i in _plain(tokens) if change(tokens[i]) != tokens[i]]
    for i in rng.sample(able, min(len(able), rng.randint(1, 3))):
        tokens[i] = change(tokens[i])
    return bool(able)


def punctuate(tokens: list[str], rng: random.Random) -> bool:
    """Remove or change a token's trailing punctuation, add a comma, or drop an apostrophe."""
    marked = [i for i, t in enumerate(tokens) if 0 < len(_trailing(t)) < len(t)]
    quoted = [i for i, t in enumerate(tokens) if _APOSTROPHE.search(t) and not is_number(t)]
    how = rng.choice(("remove", "change", "comma", "apostrophe"))
    if how in ("remove", "change") and marked:
        i = rng.choice(marked)
        old = _trailing(tokens[i])
        mark = "" if how == "remove" else rng.choice([m for m in _MARKS if m != old])
        tokens[i] = tokens[i][: -len(old)] + mark
    elif how == "apostrophe" and quoted:
        i = rng.choice(quoted)
        tokens[i] = _APOSTROPHE.sub("", tokens[i], count=1)
    else:
        bare = [i for i in _plain(tokens) if not _trailing(tokens[i])]
        if not bare:
            return False
        tokens[rng.choice(bare)] += ","
    return True


def swap_words(tokens: list[str], rng: random.Random) -> bool:
    pairs = [i for i in range(len(tokens) - 1)
             if not is_number(tokens[i]) and not is_number(tokens[i + 1])
             and tokens[i].lower() != tokens[i + 1].lower()]
    if not pairs:
        return False
    i = rng.choice(pairs)
    tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
    return True


EDITS: dict[str, Callable[[list[str], random.Random], bool]] = {
    "drop": drop_word, "insert": insert_word, "recase": recase, "punct": punctuate,
    "swap": swap_words,
}


def light_edit(text: str, rng: random.Random, n_edits: int | None = None) -> Edited:
    """A lightly edited copy: `n_edits` (default 1-3, uniform) edits of random kinds, numbers
    intact. An edit that finds nothing to act on (e.g. no punctuation) is replaced by another."""
    tokens = text.split()
    wanted = n_edits if n_edits is not None else rng.randint(1, 3)
    ops: list[str] = []
    for _ in range(wanted * 10):
        if len(ops) == wanted:
            break
        kind = rng.choice(KINDS)
        if EDITS[kind](tokens, rng):
            ops.append(kind)
    return Edited(" ".join(tokens), tuple(ops))


def renumber(text: str, rng: random.Random) -> str | None:
    """A distinct problem: one number of the question replaced by another (None: no number)."""
    spans = [m.span() for m in re.finditer(r"\d+", text)]
    if not spans:
        return None
    lo, hi = rng.choice(spans)
    old = int(text[lo:hi])
    new = rng.choice([v for v in range(max(2, old - 9), old + 11) if v != old])
    return text[:lo] + str(new) + text[hi:]
