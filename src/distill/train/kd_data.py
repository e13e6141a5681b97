"""KD's data side: sft rows → training examples whose soft targets are in the student's vocabulary.

The training sequence is the teacher's own generated tokens (`token_ids`), so position j of the
completion is the position whose top-k the teacher reported — no re-tokenization drift. Rows
from an OpenAI-compatible server have token *strings* and no ids: each string is looked up in the
student's vocabulary (as is, as byte-level BPE, as SentencePiece, or vLLM's "token_id:N"), and
the response is re-tokenized with the student tokenizer; a row whose token count disagrees with
its top-k count keeps only the hard-token loss (counted in `info["rows_misaligned"]`).

`train.packing` does not apply here: each example is one conversation, right-padded.

How the teacher's soft targets become student-vocabulary targets depends on the tokenizers
(`train.kd.cross_tokenizer`, resolved by `distill.train.xtok.resolve_cross_tokenizer`):

- **exact** (one vocabulary): `require_shared_vocabulary` checks the teacher's ids or strings
  mean the same tokens to the student, and `kd_training_examples` maps the stored top-k token
  by token with `TokenMapper` (or the local teacher scores the same ids during training). A
  mismatch is a ConfigError, not a silent garbage loss.
- **align / uld** (different tokenizers): `xtok_examples` trains the student on its own tokens
  of the teacher's completion text and projects the teacher's top-k onto them
  (`distill.train.xtok_rows.row_targets`), plus the ULD targets at span starts. A local
  teacher is scored once up front into the same stored-top-k form (`teacher_scored_rows`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from distill.chat_template import render_chat
from distill.config import ConfigError, PipelineConfig
from distill.io import read_stage_rows
from distill.records import RunDir
from distill.train.common import check_vocab, load_teacher_tokenizer, local_teacher_name
from distill.train.losses import NEG

if TYPE_CHECKING:
    from distill.train.xtok import AlignStats

# --- where the soft targets come from -------------------------------------------------------------


def join_generations(run_dir: RunDir | None, rows: list[dict[str, Any]]
                     ) -> list[dict[str, Any]]:
    """sft rows written before they carried soft targets: take them from generate/ by id."""
    if run_dir is None or any(r.get("top_logprobs") or r.get("token_ids") for r in rows):
        return rows
    gen_dir = run_dir.stage("generate")
    if not (gen_dir / "generations.jsonl").exists():
        return rows
    keys = ("top_logprobs", "token_ids", "finish_reason", "response")
    gens = {g["id"]: g for g in read_stage_rows(gen_dir, "generations.jsonl")}
    return [r | {k: gens[r["id"]].get(k) for k in keys if k in gens.get(r["id"], {})}
            for r in rows]


def soft_target_source(cfg: PipelineConfig, rows: list[dict[str, Any]]) -> str:
    """"stored" or "teacher", per `kd.soft_targets`, or a ConfigError saying what is missing."""
    mode = cfg.train.kd.soft_targets
    has_stored = any(r.get("top_logprobs") for r in rows)
    if mode == "auto":
        mode = "stored" if has_stored else "teacher"
        if mode == "teacher" and local_teacher_name(cfg) is None:
            raise ConfigError(
                "train.method kd: no soft targets — the training rows carry no top_logprobs "
                "(set teacher.top_logprobs: 20 and regenerate) and there is no local teacher "
                "(teacher.backend transformers, or train.kd.teacher_model)")
    if mode == "stored" and not has_stored:
        raise ConfigError("train.kd.soft_targets: stored, but the training rows carry no "
                          "top_logprobs (set teacher.top_logprobs and regenerate)")
    return mode


# --- the teacher's tokens in the student's vocabulary ---------------------------------------------


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte-level BPE vocabularies spell byte b as this char."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


_BYTE_CHARS = _byte_to_unicode()
_TOKEN_ID = re.compile(r"^token_id:(\d+)$")


class TokenMapper:
    """Stored teacher tokens (ids, or strings from an OpenAI-compatible server) → student ids."""

    def __init__(self, tok: Any, vocab_limit: int) -> None:
        self.tok = tok
        self.vocab: dict[str, int] = tok.get_vocab()
        self.limit = vocab_limit
        self.cache: dict[str, int | None] = {}
        self.seen = 0
        self.unmapped: Counter[str] = Counter()

    def __call__(self, token: int | str) -> int | None:
        self.seen += 1
        if isinstance(token, int):
            if 0 <= token < self.limit:
                return token
            self.unmapped[str(token)] += 1
            return None
        if token not in self.cache:
            self.cache[token] = self._lookup(token)
        tid = self.cache[token]
        if tid is None:
            self.unmapped[token] += 1
        return tid

    def _lookup(self, s: str) -> int | None:
        m = _TOKEN_ID.match(s)  # vLLM's return_tokens_as_token_ids
        candidates = [int(m.group(1))] if m else []
        for form in (s, "".join(_BYTE_CHARS[b] for b in s.encode("utf-8")),
                     s.replace(" ", "\u2581")):
            if form in self.vocab:
                candidates.append(self.vocab[form])
        if not candidates:
            ids = self.tok.encode(s, add_special_tokens=False)
            if len(ids) == 1 and self.tok.decode(ids) == s:
                candidates = ids
        return next((c for c in candidates if 0 <= c < self.limit), None)


def require_shared_vocabulary(cfg: PipelineConfig, rows: list[dict[str, Any]], tok: Any,
                              teacher_tok: Any = None) -> None:
    """KD compares the two distributions id by id: the student's vocabulary must be the local
    teacher's (when its tokenizer can be loaded) and the stored ids must spell the responses."""
    vocab_tok = teacher_tok if teacher_tok is not None else load_teacher_tokenizer(cfg)
    if vocab_tok is not None:
        check_vocab(tok, vocab_tok, local_teacher_name(cfg) or "teacher")
    check_token_ids_spell_responses(rows, tok)


def check_token_ids_spell_responses(rows: list[dict[str, Any]], tok: Any) -> None:
    """Stored teacher ids, decoded with the student's tokenizer, must spell the teacher's text."""
    sample = [r for r in rows if r.get("token_ids") and r.get("response")][:32]
    if not sample:
        return

    def norm(s: str) -> str:
        return " ".join(s.split())

    ok = sum(norm(r["response"]) in norm(tok.decode(r["token_ids"], skip_special_tokens=True))
             for r in sample)
    if ok * 2 < len(sample):
        raise ConfigError(
            f"train.method kd: the teacher's stored token ids do not spell its responses in the "
            f"student's tokenizer ({ok} of {len(sample)} rows do): teacher and student "
            "vocabularies differ. Give the student the teacher's tokenizer (train.tokenizer) or "
            "use train.method: sft")


# --- rows → training examples -------------------------------------------------------------------


@dataclass
class KDExample:
    input_ids: list[int]
    """Student prompt (its chat template) + the completion tokens."""
    prompt_len: int
    topk_ids: Any = None
    """`[n, k]` long tensor: the teacher's top-k ids at the first n completion positions (built
    once here, so the collator copies slices instead of making thousands of tiny tensors)."""
    topk_logprobs: Any = None
    """`[n, k]` float: their log-probabilities (NEG where a position reported fewer than k)."""
    topk_valid: Any = None
    """`[n, k]` bool: which of the k slots hold a reported token."""
    teacher_input_ids: list[int] | None = None
    """Teacher prompt (its own rendering) + the same completion tokens, for a local teacher."""
    teacher_prompt_len: int = 0
    uld_logprobs: Any = None
    """Cross-tokenizer ULD (`distill.train.uld`): `[n, k]` float, the teacher's own top-k
    log-probs at the student positions that start where a teacher position starts."""
    uld_valid: Any = None
    """`[n, k]` bool: the reported ULD entries (a row of False: no ULD at that position)."""
    uld_scale: Any = None
    """`[n]` float: log of the teacher's span scale (`xtok.uld_steps`)."""
    span_first: Any = None
    """`[n]` long: each position's span start, completion-relative (-1: none)."""

    @property
    def completion(self) -> list[int]:
        return self.input_ids[self.prompt_len:]

    @property
    def k(self) -> int:
        return 0 if self.topk_ids is None else int(self.topk_ids.shape[1])


def topk_tensors(steps: list[list[tuple[int, float]]]) -> tuple[Any, Any, Any]:
    """Per-position (id, logprob) lists → padded `[n, k]` ids, log-probs and validity.

    One tensor per field from padded Python lists: building them position by position cost
    ~2 s per 1,000 rows."""
    n, k = len(steps), max((len(s) for s in steps), default=0)
    ids = [[i for i, _ in s] + [0] * (k - len(s)) for s in steps]
    lps = [[lp for _, lp in s] + [NEG] * (k - len(s)) for s in steps]
    valid = [[True] * len(s) + [False] * (k - len(s)) for s in steps]
    return (torch.tensor(ids, dtype=torch.long).reshape(n, k),
            torch.tensor(lps, dtype=torch.float32).reshape(n, k),
            torch.tensor(valid, dtype=torch.bool).reshape(n, k))


def _encode(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _encode_all(tok: Any, texts: list[str]) -> list[list[int]]:
    """`_encode` for many texts in one tokenizer call (a fast tokenizer batches them)."""
    return [list(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []


def _prompt_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    msgs = list(row.get("messages") or [])
    if msgs and msgs[-1].get("role") == "assistant":
        msgs = msgs[:-1]
    return msgs or [{"role": "user", "content": row["question"]}]


def _assistant_text(row: dict[str, Any]) -> str:
    msgs = row.get("messages") or []
    if msgs and msgs[-1].get("role") == "assistant":
        return str(msgs[-1].get("content") or "")
    return str(row.get("response") or "")


def completion_targets(row: dict[str, Any], tok: Any, mapper: TokenMapper | None,
                       stats: Counter[str]) -> tuple[list[int], list[list[tuple[int, float]]]]:
    """The completion token ids and, per leading position, the teacher's top-k (id, logprob).

    The completion is the teacher's generated ids when stored (else the response re-tokenized),
    closed by EOS unless the teacher was cut off by max_tokens. The EOS position has a hard label
    and no soft target when the backend did not report one.
    """
    top = row.get("top_logprobs") if mapper is not None else None
    ids = row.get("token_ids")
    retokenized = ids is None
    if ids is None:
        text = row.get("response") if top else _assistant_text(row)
        ids = _encode(tok, str(text or _assistant_text(row)))
    ids = [int(i) for i in ids]
    eos = tok.eos_token_id
    n_text = len(ids)
    if row.get("finish_reason") != "length" and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    steps: list[list[tuple[int, float]]] = []
    if top:
        assert mapper is not None
        # Ids the backend reported are aligned by construction; re-tokenized text must agree.
        if retokenized and len(top) not in (n_text, n_text + 1):
            stats["rows_misaligned"] += 1
            return ids, []
        for step in top[: len(ids)]:
            pairs = [(tid, float(lp)) for t, lp in step if (tid := mapper(t)) is not None]
            steps.append(pairs)
        stats["rows_with_soft_targets"] += 1
    return ids, steps


def fit_length(prompt: list[int], max_length: int, stats: Counter[str], completion: list[int],
               *per_position: list[Any]) -> tuple[list[Any], ...] | None:
    """(completion, *per_position) cut to the room `max_length` leaves after the prompt (lists
    aligned with the completion's tokens are cut with it), or None for a row whose prompt
    alone fills it (counted in `stats`)."""
    room = max_length - len(prompt)
    if not prompt or room < 1:
        stats["rows_too_long"] += 1
        return None
    if len(completion) > room:
        stats["rows_truncated"] += 1
        return tuple(x[:room] for x in (completion, *per_position))
    return (completion, *per_position)


def kd_examples(rows: list[dict[str, Any]], tok: Any, *, max_length: int,
                mapper: TokenMapper | None = None, teacher_tok: Any = None
                ) -> tuple[list[KDExample], Counter[str]]:
    """Training examples from sft rows. `mapper` set: use the stored top-k; `teacher_tok` set:
    also build the teacher's view of each sequence (its own prompt rendering)."""
    stats: Counter[str] = Counter()
    out = []
    prompts = _encode_all(tok, [render_chat(tok, _prompt_messages(r)) for r in rows])
    tprompts = (_encode_all(teacher_tok, [render_chat(teacher_tok, _prompt_messages(r))
                                          for r in rows]) if teacher_tok is not None else None)
    for n, (r, prompt) in enumerate(zip(rows, prompts, strict=True)):
        fitted = fit_length(prompt, max_length, stats,
                            *completion_targets(r, tok, mapper, stats))
        if fitted is None:
            continue
        completion, steps = fitted
        ex = KDExample(input_ids=prompt + completion, prompt_len=len(prompt))
        if steps:
            ex.topk_ids, ex.topk_logprobs, ex.topk_valid = topk_tensors(steps)
        if tprompts is not None:
            tprompt = tprompts[n]
            ex.teacher_input_ids, ex.teacher_prompt_len = tprompt + completion, len(tprompt)
        out.append(ex)
    return out, stats


def kd_training_examples(cfg: PipelineConfig, rows: list[dict[str, Any]], tok: Any, *,
                         source: str, vocab: int, teacher_tok: Any = None
                         ) -> tuple[list[KDExample], Counter[str]]:
    """The KD examples, with the teacher's soft targets as student-vocabulary targets.

    `source` "stored": the rows' top-k, each token mapped to the student id it names
    (`TokenMapper`); "teacher": the local teacher scores the same ids during training, so only
    its own prompt rendering is built here (`teacher_tok`). Refused when the stored tokens do not
    map or line up with the student's: the vocabularies differ.
    """
    mapper = TokenMapper(tok, vocab) if source == "stored" else None
    examples, stats = kd_examples(rows, tok, max_length=cfg.train.max_length, mapper=mapper,
                                  teacher_tok=teacher_tok)
    if mapper is not None and mapper.seen and len(mapper.unmapped) and (
            sum(mapper.unmapped.values()) > 0.05 * mapper.seen):
        example = next(iter(mapper.unmapped))
        raise ConfigError(
            f"train.method kd: {sum(mapper.unmapped.values())} of {mapper.seen} stored teacher "
            f"tokens are not in the student's vocabulary (e.g. {example!r}): teacher and "
            "student vocabularies differ. Give the student the teacher's tokenizer "
            "(train.tokenizer) or use train.method: sft")
    if stats["rows_misaligned"] > stats["rows_with_soft_targets"]:
        raise ConfigError(
            f"train.method kd: in {stats['rows_misaligned']} of "
            f"{stats['rows_misaligned'] + stats['rows_with_soft_targets']} rows the teacher's "
            "top-k steps do not line up with the student's tokens of the response: teacher and "
            "student vocabularies (tokenizers) differ. Give the student the teacher's tokenizer "
            "(train.tokenizer) or use train.method: sft")
    if not examples:
        raise ConfigError(f"train.max_length: {cfg.train.max_length} is shorter than every "
                          "prompt; no KD example left")
    return examples, stats


def xtok_examples(rows: list[dict[str, Any]], tok: Any, teacher_tok: Any, *,
                  mode: Literal["align", "uld"], max_length: int, temperature: float = 1.0
                  ) -> tuple[list[KDExample], Counter[str], AlignStats]:
    """Cross-tokenizer training examples: the student's prompt + its own tokens of the teacher's
    completion, with the teacher's top-k projected onto those tokens (`mode` "align") and the
    ULD targets (at span starts without an aligned target for "align", at every span start for
    "uld"). A row with no usable top-k trains on its response with the hard-token loss alone
    (`rows_unaligned`). `temperature` is the KD one: ULD's teacher span scales are read at it.
    """
    from distill.train.xtok import AlignStats, StudentSpeller
    from distill.train.xtok_rows import row_targets, uld_tensors
    from distill.train.xtok_tokens import TokenText

    stats: Counter[str] = Counter()
    align_stats = AlignStats()
    speller = StudentSpeller(tok)
    token_text = TokenText(teacher_tok) if teacher_tok is not None else None
    prompts = _encode_all(tok, [render_chat(tok, _prompt_messages(r)) for r in rows])
    out = []
    for r, prompt in zip(rows, prompts, strict=True):
        got = row_targets(r, tok, teacher_tok, mode=mode, stats=align_stats, counts=stats,
                          speller=speller, token_text=token_text, temperature=temperature)
        if got is None:
            completion, steps = completion_targets(r, tok, None, stats)
            uld: list[Any] = []
            first: list[int] = []
        else:
            completion, steps, uld, first = got.ids, got.steps, got.uld, got.span_first
        fitted = fit_length(prompt, max_length, stats, completion, steps, uld, first)
        if fitted is None:
            continue
        completion, steps, uld, first = fitted
        ex = KDExample(input_ids=prompt + completion, prompt_len=len(prompt))
        if any(steps):
            ex.topk_ids, ex.topk_logprobs, ex.topk_valid = topk_tensors(steps)
        if any(u is not None for u in uld):
            ex.uld_logprobs, ex.uld_valid, ex.uld_scale = uld_tensors(uld)
            ex.span_first = torch.tensor(first, dtype=torch.long)
            stats["uld_positions"] += int(ex.uld_valid.any(-1).sum())
        out.append(ex)
    return out, stats, align_stats


def xtok_training_examples(cfg: PipelineConfig, rows: list[dict[str, Any]], tok: Any,
                           teacher_tok: Any, *, mode: Literal["align", "uld"]
                           ) -> tuple[list[KDExample], Counter[str], AlignStats]:
    """`xtok_examples` with the train settings, refused when the teacher's top-k cannot be
    read in the student's terms: no row aligned at all (integer ids without a loadable
    teacher tokenizer), or string top-k that do not spell the responses."""
    examples, stats, align_stats = xtok_examples(
        rows, tok, teacher_tok, mode=mode, max_length=cfg.train.max_length,
        temperature=cfg.train.kd.temperature)
    if not stats["rows_with_soft_targets"]:
        raise ConfigError(
            f"train.kd.cross_tokenizer: {mode}: none of the {len(rows)} training rows has a "
            "teacher top-k that can be aligned (top_logprobs as token ids need the teacher's "
            "tokenizer: teacher.model or train.kd.teacher_model)")
    if stats["teacher_wildcards"] > 0.5 * stats["teacher_positions"]:
        raise ConfigError(
            f"train.kd.cross_tokenizer: {mode}: at {stats['teacher_wildcards']} of "
            f"{stats['teacher_positions']} teacher positions the stored top-k strings do not "
            "spell the response (the rows' top_logprobs belong to another text or tokenizer)")
    if not examples:
        raise ConfigError(f"train.max_length: {cfg.train.max_length} is shorter than every "
                          "prompt; no KD example left")
    return examples, stats, align_stats


def teacher_prompts_and_texts(rows: list[dict[str, Any]], teacher_tok: Any
                              ) -> tuple[list[list[int]], list[str]]:
    """The local teacher's prompt ids (its own chat rendering) and each row's completion text,
    for `xtok_rows.teacher_scored_rows`."""
    prompts = _encode_all(teacher_tok, [render_chat(teacher_tok, _prompt_messages(r))
                                        for r in rows])
    return prompts, [_assistant_text(r) for r in rows]


@dataclass
class KDCollator:
    """Right-padded student (and teacher) sequences plus the completion-position index tensors:
    `pos[b, j]` is the position whose logits predict completion token j."""

    pad_id: int
    teacher_pad_id: int | None = None

    def __call__(self, batch: list[KDExample]) -> dict[str, Any]:
        bsz = len(batch)
        seq = max(len(e.input_ids) for e in batch)
        comp = max(len(e.completion) for e in batch)
        k = max(e.k for e in batch)
        out: dict[str, Any] = {
            "input_ids": torch.full((bsz, seq), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((bsz, seq), dtype=torch.long),
            "pos": torch.zeros((bsz, comp), dtype=torch.long),
            "labels": torch.full((bsz, comp), -100, dtype=torch.long),
            "soft_mask": torch.zeros((bsz, comp), dtype=torch.bool),
        }
        if k:
            out |= {"topk_ids": torch.zeros((bsz, comp, k), dtype=torch.long),
                    "topk_logprobs": torch.full((bsz, comp, k), NEG),
                    "topk_valid": torch.zeros((bsz, comp, k), dtype=torch.bool)}
        ku = max(e.uld_valid.shape[1] if e.uld_valid is not None else 0 for e in batch)
        if ku:
            out |= {"uld_logprobs": torch.full((bsz, comp, ku), NEG),
                    "uld_valid": torch.zeros((bsz, comp, ku), dtype=torch.bool),
                    "uld_scale": torch.zeros((bsz, comp)),
                    "span_first": torch.full((bsz, comp), -1, dtype=torch.long)}
        tpad = self.teacher_pad_id if batch[0].teacher_input_ids is not None else None
        if tpad is not None:
            tseq = max(len(e.teacher_input_ids or []) for e in batch)
            out |= {"teacher_input_ids": torch.full((bsz, tseq), tpad, dtype=torch.long),
                    "teacher_attention_mask": torch.zeros((bsz, tseq), dtype=torch.long),
                    "teacher_pos": torch.zeros((bsz, comp), dtype=torch.long)}
        for b, e in enumerate(batch):
            n, c, p = len(e.input_ids), len(e.completion), e.prompt_len
            out["input_ids"][b, :n] = torch.tensor(e.input_ids)
            out["attention_mask"][b, :n] = 1
            out["pos"][b, :c] = torch.arange(p - 1, p - 1 + c)
            out["labels"][b, :c] = torch.tensor(e.completion)
            if tpad is not None:
                assert e.teacher_input_ids is not None
                tn, tp = len(e.teacher_input_ids), e.teacher_prompt_len
                out["teacher_input_ids"][b, :tn] = torch.tensor(e.teacher_input_ids)
                out["teacher_attention_mask"][b, :tn] = 1
                out["teacher_pos"][b, :c] = torch.arange(tp - 1, tp - 1 + c)
                if not k:  # full teacher logits: every completion position has a target
                    out["soft_mask"][b, :c] = True
            if e.k:
                m, ke = e.topk_ids.shape
                out["topk_ids"][b, :m, :ke] = e.topk_ids
                out["topk_logprobs"][b, :m, :ke] = e.topk_logprobs
                out["topk_valid"][b, :m, :ke] = e.topk_valid
                out["soft_mask"][b, :m] = e.topk_valid.any(-1)
            if ku and e.uld_valid is not None:
                m, ke = e.uld_valid.shape
                out["uld_logprobs"][b, :m, :ke] = e.uld_logprobs
                out["uld_valid"][b, :m, :ke] = e.uld_valid
                out["uld_scale"][b, :m] = e.uld_scale
                out["span_first"][b, :m] = e.span_first
        return out
