"""White-box distillation: the student learns the teacher's distribution, not only its tokens.

    loss = alpha * CE(teacher's tokens) + (1 - alpha) * T^2 * D(teacher_T || student_T)
           [+ hidden_weight * hidden-state loss]

on the assistant tokens only (`distill.train.losses`). Two sources of soft targets:

- **stored top-k** (`teacher.top_logprobs: k` at generate time, any backend): per generated token
  the teacher's k most likely (token, logprob) pairs. The approximation: the teacher is taken to
  be softmax(logprob / T) renormalized over its k tokens — no mass on the rest of the vocabulary
  — and the student's full-vocabulary log-probs softmax(logits / T) are gathered at the same k
  ids (plus one bucket for everything else), so forward KL and JSD are exact against that
  truncated teacher and still push the student's tail down. Reverse KL, infinite against an
  empty tail, compares the two renormalized on the k ids (`losses.topk_divergence`). With
  k = 20 a peaked teacher's top-k usually holds > 99% of its mass, so little is lost; the
  stored log-probs are the raw (T = 1) distribution the backends report.
- **a local teacher** (`kd.soft_targets: teacher`, or auto when nothing is stored): its full
  logits, computed on the same tokens during training; also feeds the hidden-state loss.

The training sequence is the teacher's own generated tokens (`token_ids`), so position j of the
completion is the position whose top-k the teacher reported — no re-tokenization drift. Rows
from an OpenAI-compatible server have token *strings* and no ids: each string is looked up in the
student's vocabulary (as is, as byte-level BPE, as SentencePiece, or vLLM's "token_id:N"), and
the response is re-tokenized with the student tokenizer; a row whose token count disagrees with
its top-k count keeps only the hard-token loss (counted in `info["rows_misaligned"]`).

`train.packing` does not apply here: each example is one conversation, right-padded.

A shared vocabulary is required: token ids (or strings) of the teacher must mean the same
tokens to the student. A mismatch is a ConfigError, not a silent garbage loss.

`train.method: gkd` (on-policy) lives in `distill.train.gkd`; `train_kd` dispatches to it.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.config import ConfigError, PipelineConfig
from distill.records import RunDir
from distill.train.losses import (
    NEG,
    divergence_beta,
    gather_positions,
    hidden_state_loss,
    kd_loss,
)
from distill.train.student import build_student, count_params, load_tokenizer

# --- the local teacher -------------------------------------------------------------------------


def local_teacher_name(cfg: PipelineConfig) -> str | None:
    """The teacher model to run in-process (on-the-fly logits, hidden states, GKD), if any."""
    name = cfg.train.kd.teacher_model
    if name is None and cfg.teacher.backend in ("transformers", "vllm") and cfg.teacher.model:
        name = cfg.teacher.model
    if not name:
        return None
    return str(cfg.resolve(name)) if cfg.resolve(name).exists() else name


def load_teacher(cfg: PipelineConfig) -> tuple[Any, Any]:
    """(model, tokenizer) of the local teacher, frozen, in eval mode."""
    from distill.teachers.transformers_backend import load_causal_lm

    name = local_teacher_name(cfg)
    if name is None:
        raise ConfigError("train.kd: this needs a local teacher; set train.kd.teacher_model or "
                          "use teacher.backend: transformers")
    model, tok = load_causal_lm(name, trust_remote_code=cfg.teacher.trust_remote_code,
                                dtype=cfg.teacher.dtype, device="cpu")
    model.requires_grad_(False)
    return model, tok


def load_teacher_tokenizer(cfg: PipelineConfig) -> Any | None:
    """The local teacher's tokenizer when it can be loaded (offline), else None."""
    from transformers import AutoTokenizer

    name = local_teacher_name(cfg)
    if name is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.teacher.trust_remote_code)
    except (OSError, ValueError):
        return None


# --- vocabularies ------------------------------------------------------------------------------


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


def check_vocab(student_tok: Any, teacher_tok: Any, teacher_name: str) -> None:
    """Every teacher token must be the same id in the student's vocabulary (equal, or the student
    extends the teacher's with tokens of its own)."""
    teacher_vocab, student_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    differ = [t for t, i in teacher_vocab.items() if student_vocab.get(t) != i]
    if differ:
        raise ConfigError(
            f"train.method kd: teacher and student vocabularies differ: the teacher's "
            f"({teacher_name}, {len(teacher_vocab)} tokens) and the student's "
            f"({len(student_vocab)}) disagree on {len(differ)} tokens (e.g. {differ[0]!r}). KD "
            "compares the two distributions token by token and needs one vocabulary: give the "
            "student the teacher's tokenizer (train.tokenizer) or use train.method: sft")


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
    import torch

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


def kd_examples(rows: list[dict[str, Any]], tok: Any, *, max_length: int,
                mapper: TokenMapper | None = None, teacher_tok: Any = None
                ) -> tuple[list[KDExample], Counter[str]]:
    """Training examples from sft rows. `mapper` set: use the stored top-k; `teacher_tok` set:
    also build the teacher's view of each sequence (its own prompt rendering)."""
    from distill.chat_template import render_chat

    stats: Counter[str] = Counter()
    out = []
    prompts = _encode_all(tok, [render_chat(tok, _prompt_messages(r)) for r in rows])
    tprompts = (_encode_all(teacher_tok, [render_chat(teacher_tok, _prompt_messages(r))
                                          for r in rows]) if teacher_tok is not None else None)
    for n, (r, prompt) in enumerate(zip(rows, prompts, strict=True)):
        completion, steps = completion_targets(r, tok, mapper, stats)
        room = max_length - len(prompt)
        if not prompt or room < 1:
            stats["rows_too_long"] += 1
            continue
        if len(completion) > room:
            stats["rows_truncated"] += 1
            completion, steps = completion[:room], steps[:room]
        ex = KDExample(input_ids=prompt + completion, prompt_len=len(prompt))
        if steps:
            ex.topk_ids, ex.topk_logprobs, ex.topk_valid = topk_tensors(steps)
        if tprompts is not None:
            tprompt = tprompts[n]
            ex.teacher_input_ids, ex.teacher_prompt_len = tprompt + completion, len(tprompt)
        out.append(ex)
    return out, stats


@dataclass
class KDCollator:
    """Right-padded student (and teacher) sequences plus the completion-position index tensors:
    `pos[b, j]` is the position whose logits predict completion token j."""

    pad_id: int
    teacher_pad_id: int | None = None

    def __call__(self, batch: list[KDExample]) -> dict[str, Any]:
        import torch

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
        teacher = self.teacher_pad_id is not None and batch[0].teacher_input_ids is not None
        if teacher:
            tseq = max(len(e.teacher_input_ids or []) for e in batch)
            out |= {"teacher_input_ids": torch.full((bsz, tseq), self.teacher_pad_id,
                                                    dtype=torch.long),
                    "teacher_attention_mask": torch.zeros((bsz, tseq), dtype=torch.long),
                    "teacher_pos": torch.zeros((bsz, comp), dtype=torch.long)}
        for b, e in enumerate(batch):
            n, c, p = len(e.input_ids), len(e.completion), e.prompt_len
            out["input_ids"][b, :n] = torch.tensor(e.input_ids)
            out["attention_mask"][b, :n] = 1
            out["pos"][b, :c] = torch.arange(p - 1, p - 1 + c)
            out["labels"][b, :c] = torch.tensor(e.completion)
            if teacher:
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
        return out


# --- hidden-state transfer ----------------------------------------------------------------------


def layer_pairs(cfg: PipelineConfig, student: Any, teacher: Any) -> list[tuple[int, int]]:
    """`kd.hidden_layers`, checked against both depths (indices into output_hidden_states)."""
    pairs = list(cfg.train.kd.hidden_layers) or [(-1, -1)]
    for who, model, idx in (("student", student, 0), ("teacher", teacher, 1)):
        n = model.config.get_text_config().num_hidden_layers + 1
        for pair in pairs:
            if not -n <= pair[idx] < n:
                raise ConfigError(f"train.kd.hidden_layers: {list(pair)}: the {who} has {n} "
                                  f"hidden states (0 = embeddings .. {n - 1}); index {pair[idx]} "
                                  "is out of range")
    return pairs


def hidden_projections(student: Any, teacher: Any, n: int) -> Any:
    """One learned linear map student hidden size → teacher hidden size per layer pair."""
    import torch

    ds = student.config.get_text_config().hidden_size
    dt = teacher.config.get_text_config().hidden_size
    return torch.nn.ModuleList([torch.nn.Linear(ds, dt, bias=False) for _ in range(n)])


def layer_loss(kd: Any, pairs: list[tuple[int, int]], projections: Any,
               student_states: tuple[Any, ...], teacher_states: tuple[Any, ...],
               student_pos: Any, teacher_pos: Any | None, mask: Any) -> Any:
    """Mean hidden-state loss over the layer pairs, at the completion positions."""
    total = 0.0
    for (si, ti), proj in zip(pairs, projections, strict=True):
        s, t = student_states[si], teacher_states[ti]
        if student_pos is not None:
            s = gather_positions(s, student_pos)
            t = gather_positions(t, teacher_pos)
        total = total + hidden_state_loss(s, t, proj, mask, kd.hidden_loss)
    return total / len(pairs)


class ProjectionsInOptimizer:
    """Trainer mixin: the hidden-state projections train alongside the student."""

    projections: Any = None
    optimizer: Any

    def create_optimizer(self, model: Any = None) -> Any:
        opt = super().create_optimizer(model)  # type: ignore[misc]
        if self.projections is not None:
            opt.add_param_group({"params": list(self.projections.parameters()),
                                 "weight_decay": 0.0})
        return opt


class LossPartsLogging:
    """Trainer mixin: the loss's parts (ce, soft, hidden), averaged since the last log line."""

    _parts: defaultdict[str, list[float]]

    def _record(self, **parts: Any) -> None:
        for k, v in parts.items():
            if v is not None:
                self._parts[k].append(float(v.detach()) if hasattr(v, "detach") else float(v))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for k, vs in self._parts.items():
                logs[k] = round(sum(vs) / len(vs), 6)
            self._parts.clear()
        super().log(logs, start_time)  # type: ignore[misc]


# --- the trainer --------------------------------------------------------------------------------


def make_kd_trainer_class() -> type:
    import torch
    from transformers import Trainer

    from distill.train.sampler import BucketedSampling

    class KDTrainer(LossPartsLogging, ProjectionsInOptimizer, BucketedSampling, Trainer):
        """transformers' Trainer (schedule, accumulation, logging, devices) with the KD loss."""

        loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by accumulation

        def __init__(self, *args: Any, kd: Any, teacher: Any = None, projections: Any = None,
                     layer_pairs: list[tuple[int, int]] | None = None, vocab: int,
                     **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.kd, self.teacher, self.vocab = kd, teacher, vocab
            self.projections, self.pairs = projections, layer_pairs or []
            self.beta = divergence_beta(kd.divergence, kd.beta)
            self._parts = defaultdict(list)
            if teacher is not None:
                teacher.to(self.args.device).eval()
            if projections is not None:
                projections.to(self.args.device)

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            hidden = self.projections is not None
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        output_hidden_states=hidden, use_cache=False)
            logits = gather_positions(out.logits, inputs["pos"])[..., : self.vocab]
            t_out = None
            if self.teacher is not None and "teacher_input_ids" in inputs:
                with torch.no_grad():
                    t_out = self.teacher(input_ids=inputs["teacher_input_ids"],
                                         attention_mask=inputs["teacher_attention_mask"],
                                         output_hidden_states=hidden, use_cache=False)
            if "topk_ids" in inputs:
                parts = kd_loss(logits, inputs["labels"], inputs["topk_logprobs"],
                                inputs["soft_mask"], alpha=self.kd.alpha,
                                temperature=self.kd.temperature, beta=self.beta,
                                topk_ids=inputs["topk_ids"], topk_valid=inputs["topk_valid"])
            elif t_out is not None:
                t_logits = gather_positions(t_out.logits, inputs["teacher_pos"])[..., : self.vocab]
                parts = kd_loss(logits, inputs["labels"], t_logits, inputs["soft_mask"],
                                alpha=self.kd.alpha, temperature=self.kd.temperature,
                                beta=self.beta)
            else:  # no soft target in this batch: the hard-token loss alone
                parts = kd_loss(logits, inputs["labels"], logits.detach(), inputs["soft_mask"],
                                alpha=1.0, temperature=1.0, beta=0.0)
            loss, h = parts.loss, None
            if hidden and t_out is not None:
                h = layer_loss(self.kd, self.pairs, self.projections, out.hidden_states,
                               t_out.hidden_states, inputs["pos"], inputs["teacher_pos"],
                               inputs["labels"] != -100)
                loss = loss + self.kd.hidden_weight * h
            self._record(ce=parts.ce, soft=parts.soft, hidden=h)
            return (loss, out) if return_outputs else loss

        def example_lengths(self, data: Any) -> list[int]:
            return [len(e.input_ids) for e in data]  # KDExample objects, not dataset rows

    return KDTrainer


def training_kwargs(cfg: PipelineConfig, output_dir: str) -> dict[str, Any]:
    """TrainingArguments shared by KD and GKD: the same schedule as the SFT student."""
    import torch

    t = cfg.train
    return dict(
        output_dir=output_dir, num_train_epochs=t.epochs, max_steps=t.max_steps,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        logging_steps=t.logging_steps, save_strategy="no", report_to="none",
        seed=t.seed if t.seed is not None else cfg.seed, bf16=t.bf16,
        activation_checkpointing=t.gradient_checkpointing,  # the new name of gradient_checkpointing
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def lora_config(cfg: PipelineConfig) -> Any:
    if cfg.train.lora is None:
        return None
    from peft import LoraConfig

    lo = cfg.train.lora
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                      target_modules=lo.target_modules, task_type="CAUSAL_LM")


def save_student(trainer: Any, tok: Any, out_dir: Path, cfg: PipelineConfig,
                 info: dict[str, Any]) -> None:
    """Like the SFT student: merged weights in `out_dir` (adapter in `adapter/` with LoRA)."""
    from distill.train.saving import save_student_dir
    from distill.train.sft import model_card

    info["world_size"] = trainer.accelerator.num_processes
    kd = cfg.train.kd
    card = model_card(cfg, info) + (
        f"- soft targets: {info.get('soft_targets')} (T = {kd.temperature}, "
        f"alpha = {kd.alpha}, divergence = {kd.divergence}"
        + (f", beta = {kd.beta}" if kd.divergence == "jsd" else "")
        + (f", lmbda = {kd.lmbda}" if info.get("method") == "gkd" else "") + ")\n")
    save_student_dir(trainer, tok, out_dir, cfg, card)


def history(trainer: Any, result: Any = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The loss log; the final loss falls back to the run's mean when nothing was logged."""
    logs = [h for h in trainer.state.log_history if "loss" in h]
    last = logs[-1] if logs else {}
    fallback = getattr(result, "training_loss", None)
    return logs, {"final_loss": last.get("loss", fallback),
                  "final_ce": last.get("ce"), "final_soft": last.get("soft"),
                  "loss_history": [(h["step"], h["loss"]) for h in logs]}


def _join_generations(run_dir: RunDir | None, rows: list[dict[str, Any]]
                      ) -> list[dict[str, Any]]:
    """sft rows written before they carried soft targets: take them from generate/ by id."""
    if run_dir is None or any(r.get("top_logprobs") or r.get("token_ids") for r in rows):
        return rows
    gen_dir = run_dir.stage("generate")
    if not (gen_dir / "generations.jsonl").exists():
        return rows
    from distill.io import read_stage_rows

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


def train_kd(cfg: PipelineConfig, run_dir: RunDir | None, rows: list[dict[str, Any]],
             out_dir: Path, *, label: str | None = None,
             callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train a student with soft targets (`train.method` kd, or gkd → `distill.train.gkd`) on the
    sft rows and save it to `out_dir`. Returns the same info dict as `train_sft`."""
    if cfg.train.method == "gkd":
        from distill.train.gkd import train_gkd

        return train_gkd(cfg, rows, out_dir, label=label or "gkd", callbacks=callbacks)

    from distill.train.memory import cpu_training_memory
    from distill.train.progress import quiet_trainer, training_callbacks

    cpu_training_memory()
    kd = cfg.train.kd
    rows = _join_generations(run_dir, rows)
    source = soft_target_source(cfg, rows)
    tok = load_tokenizer(cfg)
    need_teacher = source == "teacher" or kd.hidden_weight > 0
    teacher, teacher_tok = load_teacher(cfg) if need_teacher else (None, None)
    vocab_tok = teacher_tok if teacher_tok is not None else load_teacher_tokenizer(cfg)
    if vocab_tok is not None:
        check_vocab(tok, vocab_tok, local_teacher_name(cfg) or "teacher")
    check_token_ids_spell_responses(rows, tok)

    model = build_student(cfg, tok)
    n_params = count_params(model)
    vocab = model.get_input_embeddings().num_embeddings
    if teacher is not None:
        vocab = min(vocab, teacher.get_input_embeddings().num_embeddings)
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

    pairs, projections = None, None
    if kd.hidden_weight > 0:
        pairs = layer_pairs(cfg, model, teacher)
        projections = hidden_projections(model, teacher, len(pairs))
    if cfg.train.lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg))

    from transformers import TrainingArguments

    trainer_cls = make_kd_trainer_class()
    work = Path(tempfile.mkdtemp(prefix="distill-kd-"))
    label = label or "kd"
    try:
        trainer = trainer_cls(
            model=model, args=TrainingArguments(**training_kwargs(cfg, str(work))),
            train_dataset=examples,
            data_collator=KDCollator(tok.pad_token_id,
                                     teacher_tok.pad_token_id if teacher_tok is not None
                                     else None),
            callbacks=[*training_callbacks(label), *(callbacks or [])],
            kd=kd, teacher=teacher, projections=projections, layer_pairs=pairs, vocab=vocab,
            group_by_length=cfg.train.group_by_length,
        )
        t0 = time.perf_counter()
        result = quiet_trainer(trainer).train()
        train_s = time.perf_counter() - t0
        _, hist = history(trainer, result)
        info = {
            "label": label, "method": "kd", "params": n_params, "train_rows": len(examples),
            "steps": trainer.state.global_step, "train_s": round(train_s, 2),
            "train_loss": result.training_loss, "lora": cfg.train.lora is not None,
            "soft_targets": "stored top-k" if source == "stored" else "teacher logits",
            "top_k": max((e.k for e in examples), default=0) or None,
            "rows_with_soft_targets": (stats["rows_with_soft_targets"] if source == "stored"
                                       else len(examples)),
            "rows_misaligned": stats["rows_misaligned"],
            "rows_truncated": stats["rows_truncated"], "rows_too_long": stats["rows_too_long"],
            "hidden_layers": [list(p) for p in pairs] if pairs else None,
        } | hist
        save_student(trainer, tok, out_dir, cfg, info)
        return info
    finally:
        shutil.rmtree(work, ignore_errors=True)
