"""Cross-tokenizer distillation: line up teacher and student tokens over the same text.

A teacher and a student with different tokenizers split one completion differently ("127" may
be the teacher's "1", "2", "7" and the student's "127"). `align` walks both token sequences in
UTF-8 byte offsets and cuts wherever both have a token boundary, giving *spans*: a run of
teacher tokens and a run of student tokens that cover the same bytes (1:1, 1:n, n:1 or n:m).
It then projects the teacher's stored top-k onto student token ids, per student position.

**The projection.** Within a span starting at byte a, the teacher's top-k lists describe
disjoint *events* "the text from a continues with w": at each teacher position i of the span,
every candidate c other than the sampled one is the event w = text[a:start_i] + c, with
probability P(sampled tokens before i) * P(c); at the span's last position the sampled token is
an event too (the others were expanded into the next position's list). A student position j of
the span has already read the prefix p = text[a:start_j]; its target puts each event w that
extends p on the student token the student's tokenizer puts first on w[len(p):], and
renormalizes over the mapped mass. For a 1:1 span with one-token candidates this is the exact
top-k of today's same-vocabulary KD. Approximations, each counted in `AlignStats`:

- a candidate's remainder is tokenized alone, not in context; the sampled path uses the
  student's real token;
- *open* mass: when the student's first token covers all of a candidate's remainder, the
  teacher's continuation past it is unknown and the student's true token may be longer (the
  teacher says "1" where the student would write "127"); the mass still goes to that token;
- *unmapped* mass: candidates the student cannot spell (unknown bytes, `<unk>`, partial UTF-8
  with nothing decodable) and events that end inside p (their continuation is unknown);
- events that contradict p are not part of the conditional and are dropped;
- a span whose sampled token before its last position is outside the top-k has no weight for
  its later events: all its positions are left without a target (`spans_broken`).

A student position with no target (nothing mapped, less than `min_mapped` of the mass mapped,
`<unk>` text, a broken span) is None: the caller falls back to ULD there when the position
starts where a teacher position starts (`teacher_pos`), else to the hard-token loss alone.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from distill.train.xtok_tokens import Candidate, TeacherSeq, TokenText

Mode = Literal["uld", "align", "auto"]
Resolved = Literal["exact", "align", "uld"]


@dataclass
class Span:
    """Teacher positions [t0, t1) and student positions [s0, s1) over bytes [start, end)."""

    t0: int
    t1: int
    s0: int
    s1: int
    start: int
    end: int

    @property
    def kind(self) -> str:
        t, s = self.t1 - self.t0, self.s1 - self.s0
        return "1:1" if t == s == 1 else "1:n" if t == 1 else "n:1" if s == 1 else "n:m"


@dataclass
class Target:
    """A sparse teacher distribution over student ids at one student position."""

    ids: list[int]
    probs: list[float]
    """Sum to 1: the mapped mass, renormalized."""
    mapped: float
    """The share of the teacher's (consistent) top-k mass that mapped to a student token."""


@dataclass
class AlignStats:
    """Counts over student positions and teacher probability mass; they add across rows."""

    positions: int = 0
    one_to_one: int = 0
    """Positions with a target in 1:1 spans."""
    merged: int = 0
    """Positions with a target in 1:n, n:1 and n:m spans."""
    unaligned: int = 0
    """Positions without a target (including the unknown ones)."""
    unknown: int = 0
    """Positions on a student `<unk>` token."""
    unknown_chars: int = 0
    """Characters the student covers with `<unk>` or with no token at all."""
    spans_broken: int = 0
    mass: float = 0.0
    """Teacher top-k probability mass consistent with the positions' prefixes."""
    mass_mapped: float = 0.0
    mass_open: float = 0.0

    def __iadd__(self, other: AlignStats) -> AlignStats:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def summary(self) -> dict[str, float]:
        n, m = max(self.positions, 1), self.mass or 1.0
        return {"positions": self.positions, "one_to_one": round(self.one_to_one / n, 4),
                "merged": round(self.merged / n, 4), "unaligned": round(self.unaligned / n, 4),
                "unknown": self.unknown, "unknown_chars": self.unknown_chars,
                "spans_broken": self.spans_broken,
                "mass_mapped": round(self.mass_mapped / m, 4),
                "mass_open": round(self.mass_open / m, 4)}


@dataclass
class Alignment:
    """A completion as the student trains on it, with per-position teacher targets."""

    text: str
    student_ids: list[int]
    """The student's tokens of `text`, then its EOS when asked for."""
    targets: list[Target | None]
    teacher_pos: list[int | None]
    """The teacher position whose prediction starts at the same byte as this student position's
    (the first position of each span; the EOS step for the EOS), for ULD; None inside spans."""
    span_first: list[int]
    """The student index of the first position of this position's span (-1: none)."""
    spans: list[Span]
    stats: AlignStats = field(default_factory=AlignStats)

    def topk_steps(self) -> list[list[tuple[int, float]]]:
        """Targets as the (student id, logprob) lists `kd.topk_tensors` takes ([] = none)."""
        return [[] if t is None else [(i, math.log(p)) for i, p in zip(t.ids, t.probs,
                                                                         strict=True) if p > 0]
                for t in self.targets]


class StudentSpeller:
    """The student's first token on a string of bytes (cached): (id, its byte length, unk)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.unk = tok.unk_token_id
        self.token_text = TokenText(tok)
        self.cache: dict[bytes, tuple[int, int, bool] | None] = {}

    def __call__(self, data: bytes) -> tuple[int, int, bool] | None:
        if data not in self.cache:
            self.cache[data] = self._first(data)
        return self.cache[data]

    def _first(self, data: bytes) -> tuple[int, int, bool] | None:
        text = _valid_prefix(data)
        if not text:
            return None
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            if e > s:
                return int(tid), len(text[:e].encode("utf-8")), tid == self.unk
        return None


def _valid_prefix(data: bytes) -> str:
    """The longest prefix of `data` that is valid UTF-8, decoded."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        return data[: err.start].decode("utf-8")


def student_bounds(tok: Any, text: str, token_text: TokenText | None = None
                   ) -> tuple[list[int], list[int], int]:
    """The student's tokens of `text`, each token's end as a byte offset, and the number of
    characters no token but `<unk>` covers.

    When the tokens' own bytes (`TokenText`) spell the text, their lengths give exact byte
    boundaries (a byte-level token can end inside a character). Otherwise the character offsets
    do: a boundary sits where a token ends, or where the next one starts when they overlap
    (a character split over tokens: all but the last are zero-width and glue to the last), and
    characters no token covers go to the next token, the way a space belongs to the word after
    it."""
    if not getattr(tok, "is_fast", False):
        raise ValueError("cross-tokenizer alignment needs a fast (Rust) student tokenizer: "
                         "it reads return_offsets_mapping")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    covered = [False] * len(text)
    for tid, (s, e) in zip(ids, enc["offset_mapping"], strict=True):
        if tid != tok.unk_token_id:
            covered[s:e] = [True] * (e - s)
    uncovered = covered.count(False)
    spell = token_text or TokenText(tok)
    pieces = [spell(i) for i in ids]
    data = text.encode("utf-8")
    if all(p is not None for p in pieces) and b"".join(pieces) == data:  # type: ignore[arg-type]
        ends, pos = [], 0
        for p in pieces:
            pos += len(p)  # type: ignore[arg-type]
            ends.append(pos)
        return ids, ends, uncovered
    byte_at = [0]
    for ch in text:
        byte_at.append(byte_at[-1] + len(ch.encode("utf-8")))
    offs = [(byte_at[s], byte_at[e]) for s, e in enc["offset_mapping"]]
    ends, last = [], 0
    for j, (_, e) in enumerate(offs):
        cut = min(e, offs[j + 1][0]) if j + 1 < len(offs) else byte_at[-1]
        last = max(last, cut)
        ends.append(last)
    return ids, ends, uncovered


def group_spans(t_ends: list[int], s_ends: list[int]) -> list[tuple[int, int, int, int]]:
    """Minimal runs of teacher and student tokens ending at one common byte boundary.

    Both sides are token end offsets, non-decreasing; a zero-width token joins the run after it.
    Tokens left over past the last common boundary (trailing specials) are not grouped."""
    out = []
    i = j = i0 = j0 = start = 0
    while i < len(t_ends) and j < len(s_ends):
        te, se = t_ends[i], s_ends[j]
        if te == se and te > start:
            i, j = i + 1, j + 1
            out.append((i0, i, j0, j))
            i0, j0, start = i, j, te
        elif te <= se:
            i += 1
        else:
            j += 1
    return out


@dataclass
class _Event:
    text: bytes | None
    prob: float
    eos: bool
    sampled: bool
    """The sampled path through the whole span: its student tokens are the real ones."""


def _span_events(teacher: TeacherSeq, span: Span, t_starts: list[int], data: bytes
                 ) -> list[_Event] | None:
    """The disjoint events of a span (module docstring); None when the span is broken."""
    events: list[_Event] = []
    logmass = 0.0
    for i in range(span.t0, span.t1):
        if i >= len(teacher.steps):
            return None
        step, act, last = teacher.steps[i], teacher.actual[i], i == span.t1 - 1
        base = data[span.start: t_starts[i]]
        for k, c in enumerate(step):
            if k == act and not last:
                continue
            events.append(_Event(None if c.text is None else base + c.text,
                                 math.exp(logmass + c.logprob), c.eos, k == act))
        if not last:
            if act is None:
                return None
            logmass += step[act].logprob
    return events


def _project(events: list[_Event], prefix: bytes, own: int, speller: StudentSpeller,
             eos_id: int | None, first: bool) -> tuple[dict[int, float], float, float, float]:
    """(student id → mass, consistent mass, mapped mass, open mass) at one student position."""
    out: dict[int, float] = defaultdict(float)
    total = mapped = opened = 0.0
    for ev in events:
        w = ev.text
        if w is None:
            if first:  # its consistency with later prefixes is unknown: counted once
                total += ev.prob
            continue
        if ev.eos and w == prefix:
            total += ev.prob
            if eos_id is not None:
                out[eos_id] += ev.prob
                mapped += ev.prob
            continue
        if len(w) > len(prefix) and w.startswith(prefix):
            total += ev.prob
            rest = w[len(prefix):]
            if ev.sampled:
                out[own] += ev.prob
                mapped += ev.prob
                continue
            tok = speller(rest)
            if tok is None or tok[2]:
                continue
            out[tok[0]] += ev.prob
            mapped += ev.prob
            if tok[1] >= len(rest) and not ev.eos:
                opened += ev.prob
        elif prefix.startswith(w) and not ev.eos:
            total += ev.prob  # consistent, but what follows w is unknown
    return out, total, mapped, opened


def align(teacher: TeacherSeq, student_tok: Any, *, student_eos: bool = True,
          min_mapped: float = 0.5, speller: StudentSpeller | None = None) -> Alignment:
    """Student tokens of the teacher's completion text, with a projected target per position.

    `student_eos`: append the student's EOS (its target comes from the teacher's EOS step when
    the backend reported one). `min_mapped`: positions where less of the teacher's consistent
    top-k mass than this maps onto student tokens get no target. Text that is not valid UTF-8
    (a completion cut inside a character) is cut where it stops being valid."""
    speller = speller or StudentSpeller(student_tok)
    data = teacher.text_bytes
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        data = data[: err.start]
        text = data.decode("utf-8")
    t_starts, t_ends, pos = [], [], 0
    for piece in teacher.pieces:
        t_starts.append(pos)
        pos = min(pos + len(piece), len(data))
        t_ends.append(pos)
    ids, s_ends, uncovered = student_bounds(student_tok, text, speller.token_text)
    s_starts = [0, *s_ends[:-1]]
    n = len(ids)
    stats = AlignStats(unknown_chars=uncovered)
    targets: list[Target | None] = [None] * n
    teacher_pos: list[int | None] = [None] * n
    span_first = [-1] * n
    eos_id = student_tok.eos_token_id
    spans = [Span(t0, t1, s0, s1, t_ends[t0 - 1] if t0 else 0, t_ends[t1 - 1])
             for t0, t1, s0, s1 in group_spans(t_ends, s_ends)]
    for span in spans:
        teacher_pos[span.s0] = span.t0
        for j in range(span.s0, span.s1):
            span_first[j] = span.s0
        events = _span_events(teacher, span, t_starts, data)
        if events is None:
            stats.spans_broken += 1
            continue
        for j in range(span.s0, span.s1):
            if ids[j] == speller.unk:
                stats.unknown += 1
                continue
            prefix = data[span.start: s_starts[j]]
            targets[j] = _target(events, prefix, ids[j], speller, eos_id, j == span.s0,
                                 min_mapped, stats)
            if targets[j] is not None:
                if span.kind == "1:1":
                    stats.one_to_one += 1
                else:
                    stats.merged += 1
    if student_eos and eos_id is not None:
        ids.append(int(eos_id))
        step = teacher.eos_step
        target = None
        if step is not None:
            events = [_Event(c.text, math.exp(c.logprob), c.eos, False) for c in step]
            target = _target(events, b"", int(eos_id), speller, eos_id, True, min_mapped, stats)
        targets.append(target)
        stats.one_to_one += target is not None
        teacher_pos.append(len(teacher.pieces) if step is not None else None)
        span_first.append(len(ids) - 1 if step is not None else -1)
    stats.positions = len(ids)
    stats.unaligned = sum(t is None for t in targets)
    return Alignment(text=text, student_ids=ids, targets=targets, teacher_pos=teacher_pos,
                     span_first=span_first, spans=spans, stats=stats)


def uld_steps(alignment: Alignment, teacher: TeacherSeq, *, fallback_only: bool = True,
              temperature: float = 1.0) -> list[tuple[list[float], float] | None]:
    """Per student position, the ULD target: the teacher's top-k log-probs at the synchronous
    teacher position and the log of its span scale, or None.

    The scale is the teacher side of `uld.span_log_scale`: the product of the sampled tokens'
    probabilities at the span's later teacher positions, each from that position's top-k
    renormalized at `temperature` (as `uld.uld_topk` reads the teacher). `fallback_only`: only
    where the alignment has no target (cross_tokenizer: align); False gives every span's first
    position (cross_tokenizer: uld). A span whose later sampled tokens are outside the top-k has
    no known scale and no ULD target."""
    by_first = {s.s0: s for s in alignment.spans}
    out: list[tuple[list[float], float] | None] = []
    for j, tpos in enumerate(alignment.teacher_pos):
        if tpos is None or tpos >= len(teacher.steps) or not teacher.steps[tpos] or (
                fallback_only and alignment.targets[j] is not None):
            out.append(None)
            continue
        span = by_first.get(j)
        scale = 0.0
        for i in range(tpos + 1, span.t1 if span is not None else tpos + 1):
            act = teacher.actual[i] if i < len(teacher.actual) else None
            if act is None:
                scale = math.nan
                break
            lps = [c.logprob / temperature for c in teacher.steps[i]]
            top = max(lps)
            scale += lps[act] - top - math.log(sum(math.exp(x - top) for x in lps))
        out.append(None if math.isnan(scale)
                   else ([c.logprob for c in teacher.steps[tpos]], scale))
    return out


def _target(events: list[_Event], prefix: bytes, own: int, speller: StudentSpeller,
            eos_id: int | None, first: bool, min_mapped: float, stats: AlignStats
            ) -> Target | None:
    mass, total, mapped, opened = _project(events, prefix, own, speller, eos_id, first)
    stats.mass += total
    stats.mass_mapped += mapped
    stats.mass_open += opened
    if mapped <= 0 or mapped < min_mapped * total:
        return None
    ids = sorted(mass, key=lambda i: -mass[i])
    return Target(ids=ids, probs=[mass[i] / mapped for i in ids], mapped=mapped / total)


# --- which mode ----------------------------------------------------------------------------------


def same_vocabulary(student_tok: Any, teacher_tok: Any) -> bool:
    """Every teacher token has the same id in the student's vocabulary (which may extend it):
    the condition today's exact KD checks."""
    student = student_tok.get_vocab()
    return all(student.get(t) == i for t, i in teacher_tok.get_vocab().items())


def spelled_by_student(student_tok: Any, tokens: list[str]) -> float:
    """The share of teacher token strings that are one student token (as text, byte-level or
    SentencePiece vocab string, or vLLM's "token_id:N", taken as shared ids)."""
    from distill.train.xtok_tokens import byte_decoder

    vocab = student_tok.get_vocab()
    chars = {b: c for c, b in byte_decoder().items()}
    hits = 0
    for s in tokens:
        forms = (s, "".join(chars[b] for b in s.encode("utf-8")), s.replace(" ", "\u2581"))
        hits += s.startswith("token_id:") or any(f in vocab for f in forms)
    return hits / max(len(tokens), 1)


def resolve_cross_tokenizer(mode: Mode, student_tok: Any, teacher_tok: Any | None,
                            sample_tokens: list[str] | None = None) -> Resolved:
    """`cross_tokenizer` → the soft-target method: "exact" (today's same-vocabulary KD),
    "align" (this module, with ULD where it has no target) or "uld" (ULD only).

    `auto` is exact when the vocabularies agree: the teacher tokenizer's every token has the
    same student id, or — string top-k without a teacher tokenizer — at least 95% of a sample
    of the reported strings are single student tokens (today's TokenMapper threshold); align
    otherwise, and align when nothing tells."""
    if mode not in ("uld", "align", "auto"):
        raise ValueError(f"cross_tokenizer: {mode!r}; expected uld, align or auto")
    if mode != "auto":
        return mode
    if teacher_tok is not None:
        return "exact" if same_vocabulary(student_tok, teacher_tok) else "align"
    if sample_tokens:
        return "exact" if spelled_by_student(student_tok, sample_tokens) >= 0.95 else "align"
    return "align"


def xtok_summary_line(info: dict[str, Any]) -> str:
    """The cross-tokenizer line of a student's card and of the run report: the mode that ran
    and how much of the teacher's mass mapped ("" for same-vocabulary KD and other methods)."""
    mode, x = info.get("cross_tokenizer"), info.get("xtok")
    if mode in (None, "exact") or not x:
        return ""
    mass = (f"{x['mass_mapped'] * 100:.1f}% of the teacher's top-k mass mapped onto student "
            f"tokens, {x['positions_with_target'] * 100:.1f}% of student positions with an "
            "aligned target, " if x.get("mass_mapped") is not None else "")
    return (f"- cross-tokenizer: {mode} ({mass}{x['uld_positions']} ULD positions, "
            f"{x['rows_unaligned']} rows unaligned)\n")


__all__ = ["AlignStats", "Alignment", "Candidate", "Span", "StudentSpeller", "Target", "align",
           "group_spans", "resolve_cross_tokenizer", "same_vocabulary", "student_bounds",
           "uld_steps", "xtok_summary_line"]
