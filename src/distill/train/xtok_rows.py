"""Training rows → cross-tokenizer KD targets: the per-row step the KD data path calls.

`kd_data.completion_targets` turns a row into the completion ids and per-position top-k over
the *student's* ids, assuming one vocabulary. `row_targets` is its cross-tokenizer counterpart:
it reads the row the way the generate stage stored it (`token_ids` + integer top-k from
transformers / vLLM, or `response` + string top-k from an OpenAI-compatible server), aligns it
onto the student tokenizer (`xtok.align`) and returns the same two things — completion ids and
(student id, logprob) lists, ready for `kd_data.topk_tensors` — plus the ULD side: per position
the teacher's own top-k log-probs and span scale (`uld_tensors` pads them), and each position's
span start (`uld.span_log_scale`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from distill.train.losses import NEG
from distill.train.xtok import AlignStats, StudentSpeller, align, uld_steps
from distill.train.xtok_tokens import TeacherSeq, TokenText, teacher_from_ids, teacher_from_strings


@dataclass
class RowTargets:
    ids: list[int]
    """The student's completion tokens (its EOS last unless the teacher hit max_tokens)."""
    steps: list[list[tuple[int, float]]]
    """Per position (student id, logprob) of the aligned target; [] where there is none."""
    uld: list[tuple[list[float], float] | None]
    """Per position the teacher's top-k log-probs and log span scale, where ULD applies."""
    span_first: list[int]
    """Per position the index of its span's first position (-1: none)."""
    text: str
    """The completion text the student's tokens spell (the teacher's tokens, decoded)."""


def teacher_sequence(row: dict[str, Any], teacher_tok: Any | None,
                     token_text: TokenText | None = None) -> TeacherSeq | None:
    """The row's teacher completion in bytes, or None when it has no usable top-k: no
    `top_logprobs`, integer ids without a teacher tokenizer to spell them, or string top-k
    whose sampled path does not spell the response."""
    top = row.get("top_logprobs")
    if not top:
        return None
    ids = row.get("token_ids")
    numeric = all(isinstance(t, int) for step in top for t, _ in step)
    if ids is not None and numeric:
        if teacher_tok is None:
            return None
        return teacher_from_ids([int(i) for i in ids], [[(int(t), float(lp)) for t, lp in step]
                                                        for step in top],
                                teacher_tok, token_text)
    text = row.get("response")
    if not isinstance(text, str) or not text:
        return None
    return teacher_from_strings(text, [[(str(t), float(lp)) for t, lp in step] for step in top],
                                teacher_tok)


def row_targets(row: dict[str, Any], student_tok: Any, teacher_tok: Any | None, *,
                mode: Literal["align", "uld"], stats: AlignStats, counts: Counter[str],
                speller: StudentSpeller | None = None, token_text: TokenText | None = None,
                min_mapped: float = 0.5, temperature: float = 1.0) -> RowTargets | None:
    """Cross-tokenizer targets of one row; None when the row has none (the caller trains it on
    its response with the hard-token loss only, counted in `counts["rows_unaligned"]`).

    `mode` "align": aligned targets, ULD where a span start has none; "uld": ULD at every span
    start, no aligned targets. Pass one `speller` and `token_text` for all rows (caches)."""
    teacher = teacher_sequence(row, teacher_tok, token_text)
    if teacher is None:
        counts["rows_unaligned"] += 1
        return None
    eos = row.get("finish_reason") != "length"
    a = align(teacher, student_tok, student_eos=eos, min_mapped=min_mapped,
              speller=speller or StudentSpeller(student_tok))
    stats += a.stats
    counts["rows_with_soft_targets"] += 1
    counts["teacher_positions"] += len(teacher.pieces)
    counts["teacher_wildcards"] += teacher.wildcards
    steps = a.topk_steps() if mode == "align" else [[] for _ in a.student_ids]
    uld = uld_steps(a, teacher, fallback_only=mode == "align", temperature=temperature)
    return RowTargets(ids=a.student_ids, steps=steps, uld=uld, span_first=a.span_first,
                      text=a.text)


def uld_tensors(uld: list[tuple[list[float], float] | None]) -> tuple[Any, Any, Any]:
    """Per-position ULD targets → `[n, k]` teacher log-probs (NEG where unused), `[n, k]`
    validity and `[n]` log span scales, as `kd_data.topk_tensors` pads the aligned ones."""
    import torch

    n = len(uld)
    k = max((len(u[0]) for u in uld if u is not None), default=0)
    lps = [[NEG] * k if u is None else u[0] + [NEG] * (k - len(u[0])) for u in uld]
    valid = [[False] * k if u is None else [True] * len(u[0]) + [False] * (k - len(u[0]))
             for u in uld]
    scale = [0.0 if u is None else u[1] for u in uld]
    return (torch.tensor(lps, dtype=torch.float32).reshape(n, k),
            torch.tensor(valid, dtype=torch.bool).reshape(n, k),
            torch.tensor(scale, dtype=torch.float32))


def teacher_scored_rows(rows: list[dict[str, Any]], model: Any, teacher_tok: Any,
                        prompts: list[list[int]], texts: list[str], *, k: int,
                        batch_size: int = 8) -> list[dict[str, Any]]:
    """The rows as if the generate stage had stored a local teacher's top-k: `token_ids` (the
    teacher's tokens of each completion text) and `top_logprobs` (its `k` most likely tokens at
    every completion position and at the EOS step), from one teacher-forced pass over
    `prompts[i]` + the completion.

    Why top-k and not the full logits: a cross-tokenizer target is a projection of the teacher's
    candidates through the student's tokenizer, candidate by candidate; the full vocabulary
    would be tens of thousands of string look-ups per position for mass that a peaked teacher
    does not have (top-20 usually holds > 99% of it). The teacher is frozen, so scoring once
    before training gives the same targets as scoring every step."""
    import torch

    device = next(model.parameters()).device
    pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else 0
    comps = [list(ids) for ids in teacher_tok(texts, add_special_tokens=False)["input_ids"]]
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = range(start, min(start + batch_size, len(rows)))
        seqs = [prompts[i] + comps[i] for i in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)], mask[b, : len(s)] = torch.tensor(s), 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           use_cache=False).logits.float()
        for b, i in enumerate(chunk):
            p, n = len(prompts[i]), len(comps[i])
            lp = torch.log_softmax(logits[b, p - 1: p + n], dim=-1)  # n tokens + the EOS step
            vals, idx = lp.topk(min(k, lp.size(-1)), dim=-1)
            top = [[(int(t), float(v)) for t, v in zip(ti, tv, strict=True)]
                   for ti, tv in zip(idx.tolist(), vals.tolist(), strict=True)]
            out.append(rows[i] | {"token_ids": comps[i], "top_logprobs": top, "response": texts[i],
                                  "finish_reason": rows[i].get("finish_reason") or "stop"})
    return out
