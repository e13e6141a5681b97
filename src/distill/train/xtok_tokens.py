"""Teacher tokens as bytes: the sequence the cross-tokenizer alignment (`xtok`) lines up.

Alignment works on the UTF-8 bytes of the completion, because a token of a byte-level BPE may be
part of a character (an emoji is often three or four tokens) and byte offsets are the only
coordinates both tokenizers agree on. A teacher completion reaches training in one of two forms:

- **ids** (transformers / vLLM backends, or a local teacher): `teacher_from_ids` spells every id
  with the teacher tokenizer (`TokenText`, cached per id) — sampled tokens and top-k candidates
  alike;
- **strings** (OpenAI-compatible servers): `teacher_from_strings` decodes the reported top-k
  strings — plain text, byte-level BPE vocab strings ("Ġthe", "Ċ"), SentencePiece ("▁the",
  "<0x0A>"), partial UTF-8 as "bytes:\\xe2\\x80" or "\\xe2\\x80" (DeepSeek), vLLM's
  "token_id:N" (needs the teacher tokenizer) — and, since stored rows keep only the top-k lists
  and not the sampled token, recovers the sampled path through the response text
  (`reconstruct`): the most likely sequence of candidates that spells it, allowing a token
  outside the top-k (a "wildcard") only where no candidate fits.

A candidate whose bytes cannot be known (vLLM's bare "\\ufffd" for a partial character, an
id without a tokenizer) is kept with `text=None`: its probability counts as unmapped mass.
"""

from __future__ import annotations

import codecs
import heapq
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

REPLACEMENT = "\ufffd"
EOS_STRINGS = frozenset({"<|im_end|>", "<|end|>", "<|endoftext|>", "</s>", "<|eot_id|>",
                         "<end_of_turn>", "<|end_of_text|>", "<eos>"})
"""End-of-turn markers a server may report among the top-k when no teacher tokenizer is known."""
_TOKEN_ID = re.compile(r"^token_id:(\d+)$")
_HEX = re.compile(r"^(?:\\x[0-9a-fA-F]{2})+$")
_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
StringFormat = Literal["text", "byte_level", "sentencepiece"]


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: vocab character → the byte it stands for."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def byte_level_bytes(s: str) -> bytes | None:
    """A byte-level BPE vocab string ("Ġthe") as the bytes it spells, or None if it is not one."""
    table = byte_decoder()
    if not s or any(c not in table for c in s):
        return None
    return bytes(table[c] for c in s)


@dataclass(frozen=True)
class Candidate:
    """One entry of a teacher's top-k at one position."""

    text: bytes | None
    """The bytes the token spells; None when they cannot be known (counted as unmapped mass)."""
    logprob: float
    eos: bool = False
    """The teacher's end of sequence: maps to the student's EOS, never to text."""


@dataclass
class TeacherSeq:
    """A teacher completion in bytes: sampled tokens plus the top-k reported at each position."""

    pieces: list[bytes]
    """The sampled tokens' bytes; joined, the completion's UTF-8 (b"" for a special token)."""
    steps: list[list[Candidate]]
    """Per position the reported top-k. One more step than pieces: the EOS step (the backend
    reported the teacher's distribution where it ended)."""
    actual: list[int | None]
    """Per position, the index in `steps[i]` of the sampled token; None where it was outside
    the top-k (its probability is then unknown)."""
    wildcards: int = 0
    """Positions of a string row whose sampled token matched no top-k candidate."""

    @property
    def text_bytes(self) -> bytes:
        return b"".join(self.pieces)

    @property
    def eos_step(self) -> list[Candidate] | None:
        return self.steps[len(self.pieces)] if len(self.steps) > len(self.pieces) else None


class TokenText:
    """The bytes each id of a tokenizer spells, computed once per id.

    Decoding an id alone loses context (SentencePiece drops the leading space of a first token),
    so an id is decoded after an anchor token and the anchor's text is cut off. Ids that decode
    to U+FFFD are partial characters: a byte-level vocab string gives their bytes exactly,
    SentencePiece byte fallback ("<0xE2>") too; otherwise they are unknown (None).
    """

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.special = set(tok.all_special_ids)
        eos = tok.eos_token_id
        self.eos = {e for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None}
        self.vocab = {i: s for s, i in tok.get_vocab().items()}
        anchor = tok("a", add_special_tokens=False)["input_ids"]
        self.anchor = anchor[:1]
        self.anchor_text = self._decode(self.anchor)
        self.cache: dict[int, bytes | None] = {}

    def _decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False))

    def __call__(self, tid: int) -> bytes | None:
        if tid not in self.cache:
            self.cache[tid] = self._spell(tid)
        return self.cache[tid]

    def _spell(self, tid: int) -> bytes | None:
        if tid in self.special:
            return b""
        full = self._decode(self.anchor + [tid])
        s = (full[len(self.anchor_text):] if full.startswith(self.anchor_text)
             else self._decode([tid]))
        if REPLACEMENT not in s:
            return s.encode("utf-8")
        vocab = self.vocab.get(tid, "")
        if (m := _SP_BYTE.match(vocab)) is not None:
            return bytes([int(m.group(1), 16)])
        return byte_level_bytes(vocab)


def teacher_from_ids(token_ids: list[int], top: list[list[tuple[int, float]]] | None,
                     teacher_tok: Any, token_text: TokenText | None = None) -> TeacherSeq:
    """A completion the backend reported as ids (`token_ids`, and per position `(id, logprob)`).

    Trailing special tokens (EOS) are not pieces; a step beyond the text is the EOS step."""
    spell = token_text or TokenText(teacher_tok)
    ids = [int(t) for t in token_ids]
    while ids and ids[-1] in spell.eos:
        ids.pop()
    pieces = [spell(t) or b"" for t in ids]
    steps: list[list[Candidate]] = []
    actual: list[int | None] = []
    for n, step in enumerate(top or []):
        cands = [Candidate(spell(int(t)), float(lp), int(t) in spell.eos) for t, lp in step]
        steps.append(cands)
        sampled = ids[n] if n < len(ids) else None
        actual.append(next((k for k, (t, _) in enumerate(step) if sampled is not None
                             and int(t) == sampled), None))
    return TeacherSeq(pieces=pieces, steps=steps, actual=actual)


def string_format(top: list[list[tuple[str, float]]]) -> StringFormat:
    """How a server spelled its top-k strings: decoded text, or raw vocab strings.

    Decoded text shows real spaces and newlines; raw byte-level strings never do (a space is
    "Ġ"), SentencePiece shows "▁". Decided once per row, so a literal "Ġ" in text stays one."""
    strings = [s for step in top for s, _ in step if isinstance(s, str)]
    if any(" " in s or "\n" in s for s in strings):
        return "text"
    byte_level = sum(("Ġ" in s or "Ċ" in s) for s in strings)
    sentencepiece = sum("▁" in s for s in strings)
    if byte_level > sentencepiece:
        return "byte_level"
    return "sentencepiece" if sentencepiece else "text"


def spell_string(s: str, fmt: StringFormat, token_text: TokenText | None = None,
                 eos_strings: frozenset[str] = EOS_STRINGS) -> Candidate:
    """One reported top-k string → its bytes (logprob 0; the caller sets it)."""
    if s in eos_strings or (token_text is not None and s in {
            token_text.vocab.get(e) for e in token_text.eos}):
        return Candidate(b"", 0.0, eos=True)
    if (m := _TOKEN_ID.match(s)) is not None:
        if token_text is None:
            return Candidate(None, 0.0)
        tid = int(m.group(1))
        return Candidate(token_text(tid), 0.0, eos=tid in token_text.eos)
    if s.startswith("bytes:") or _HEX.match(s):
        try:
            return Candidate(codecs.escape_decode(s.removeprefix("bytes:").encode())[0], 0.0)
        except ValueError:
            return Candidate(None, 0.0)
    if REPLACEMENT in s:
        return Candidate(None, 0.0)
    if fmt == "byte_level":
        b = byte_level_bytes(s)
        return Candidate(b if b is not None else s.encode("utf-8"), 0.0)
    if fmt == "sentencepiece":
        if (m := _SP_BYTE.match(s)) is not None:
            return Candidate(bytes([int(m.group(1), 16)]), 0.0)
        return Candidate(s.replace("\u2581", " ").encode("utf-8"), 0.0)
    return Candidate(s.encode("utf-8"), 0.0)


def reconstruct(text: bytes, steps: list[list[Candidate]], max_wildcard: int = 16,
                max_states: int = 200_000) -> tuple[list[bytes], list[int | None], int] | None:
    """The sampled token path through `text`: (pieces, index of the sampled candidate per
    position or None for a wildcard, number of wildcards); None when no path spells it.

    A best-first search over (position, byte offset): fewest wildcards first, then the most
    likely candidates. A wildcard (the sampled token was outside the top-k) consumes 1 to
    `max_wildcard` bytes and is tried only where no candidate matches. All steps are consumed;
    a last step that holds an EOS candidate and starts at the end of the text is the EOS step.
    """
    n, size = len(steps), len(text)
    heap: list[tuple[int, float, int, int, int]] = [(0, 0.0, 0, 0, 0)]
    back: dict[tuple[int, int], tuple[int, int, int | None]] = {}
    best: dict[tuple[int, int], tuple[int, float]] = {(0, 0): (0, 0.0)}
    tie = 0
    while heap and len(best) <= max_states:
        wild, nll, _, i, o = heapq.heappop(heap)
        if best.get((i, o), (wild, nll)) < (wild, nll):
            continue
        eos_here = i == n - 1 and o == size and any(c.eos for c in steps[i])
        if (i == n and o == size) or eos_here:
            pieces, actual = _path(back, text, i, o)
            if eos_here:
                actual.append(next(k for k, c in enumerate(steps[i]) if c.eos))
            return pieces, actual, wild
        if i >= n:
            continue
        moves: list[tuple[int, int | None, float]] = [
            (o + len(c.text), k, c.logprob) for k, c in enumerate(steps[i])
            if c.text and not c.eos and text.startswith(c.text, o)]
        if not moves and o < size:
            moves = [(o + w, None, 0.0) for w in range(1, min(max_wildcard, size - o) + 1)]
        for o2, k, lp in moves:
            cost = (wild + (k is None), nll - lp)
            if cost < best.get((i + 1, o2), (1 << 30, 0.0)):
                best[(i + 1, o2)] = cost
                back[(i + 1, o2)] = (i, o, k)
                tie += 1
                heapq.heappush(heap, (*cost, tie, i + 1, o2))
    return None


def _path(back: dict[tuple[int, int], tuple[int, int, int | None]], text: bytes, i: int,
          o: int) -> tuple[list[bytes], list[int | None]]:
    """Follow the back-pointers from (i, o) to the start: the pieces and sampled indices."""
    pieces: list[bytes] = []
    actual: list[int | None] = []
    while (i, o) in back:
        pi, po, k = back[(i, o)]
        pieces.append(text[po:o])
        actual.append(k)
        i, o = pi, po
    return pieces[::-1], actual[::-1]


def teacher_from_strings(text: str, top: list[list[tuple[str, float]]],
                         teacher_tok: Any = None, tokens: list[str] | None = None,
                         eos_strings: frozenset[str] = EOS_STRINGS) -> TeacherSeq | None:
    """A completion an OpenAI-compatible server reported as top-k strings; None when its
    sampled path cannot be recovered from `text` (e.g. the text was edited after generation).

    `tokens`: the sampled token strings when the row kept them (then no reconstruction)."""
    token_text = TokenText(teacher_tok) if teacher_tok is not None else None
    fmt = string_format(top)
    steps = [[_with_lp(spell_string(s, fmt, token_text, eos_strings), lp) for s, lp in step]
             for step in top]
    data = text.encode("utf-8")
    if tokens is not None:
        sampled = [spell_string(s, fmt, token_text, eos_strings) for s in tokens]
        pieces = [c.text or b"" for c in sampled if not c.eos]
        actual = [next((k for k, c in enumerate(step) if c.text == s.text and c.eos == s.eos),
                       None) for step, s in zip(steps, sampled, strict=False)]
        return TeacherSeq(pieces=pieces, steps=steps, actual=actual)
    found = reconstruct(data, steps)
    if found is None:
        return None
    pieces, actual, wild = found
    return TeacherSeq(pieces=pieces, steps=steps, actual=actual, wildcards=wild)


def _with_lp(c: Candidate, lp: float) -> Candidate:
    return Candidate(c.text, float(lp), c.eos)
