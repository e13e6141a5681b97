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

Teacher and student with different tokenizers (`kd.cross_tokenizer`, issue #21): the soft
targets are the teacher's top-k projected onto the student's tokens of the same text
(`distill.train.xtok`, "align"), with universal logit distillation (`distill.train.uld`) where a
position has no projected target, or ULD alone ("uld"):

    loss = alpha * CE + (1 - alpha) * (T^2 * D(aligned) + uld_weight * ULD)

How rows become training examples (and when teacher and student must share a vocabulary) is
`distill.train.kd_data`. This module is the trainer: the loss, the hidden-state transfer (also
used by `distill.train.gkd`, the on-policy method) and `train_kd`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from distill.config import ConfigError, PipelineConfig
from distill.records import RunDir
from distill.train.checkpoints import Checkpoints
from distill.train.common import (
    fit,
    history,
    load_teacher,
    load_teacher_tokenizer,
    lora_config,
    model_card,
    save_student,
    training_kwargs,
)
from distill.train.head import logits_at
from distill.train.kd_data import (
    KDCollator,
    join_generations,
    kd_training_examples,
    require_shared_vocabulary,
    soft_target_source,
    teacher_prompts_and_texts,
    xtok_training_examples,
)
from distill.train.losses import (
    KDLoss,
    divergence_beta,
    gather_positions,
    hidden_state_loss,
    kd_loss,
)
from distill.train.memory import cpu_training_memory
from distill.train.progress import training_callbacks
from distill.train.sampler import BucketedSampling
from distill.train.student import build_student, count_params, load_tokenizer
from distill.train.uld import span_log_scale, uld_topk
from distill.train.xtok import Resolved, resolve_cross_tokenizer, xtok_summary_line
from distill.train.xtok_rows import teacher_scored_rows

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
    ds = student.config.get_text_config().hidden_size
    dt = teacher.config.get_text_config().hidden_size
    return torch.nn.ModuleList([torch.nn.Linear(ds, dt, bias=False) for _ in range(n)])


def layer_loss(kd: Any, pairs: list[tuple[int, int]], projections: Any,
               student_states: tuple[Any, ...], teacher_states: tuple[Any, ...],
               student_pos: Any, teacher_pos: Any, mask: Any) -> Any:
    """Mean hidden-state loss over the layer pairs, at the completion positions (all positions
    when `student_pos` is None)."""
    total: Any = 0.0
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
    pairs: list[tuple[int, int]]
    kd: Any  # the KDConfig (set by `hold_kd`)
    optimizer: Any

    def create_optimizer(self, model: Any = None) -> Any:
        opt = super().create_optimizer(model)  # type: ignore[misc]
        if self.projections is not None:
            opt.add_param_group({"params": list(self.projections.parameters()),
                                 "weight_decay": 0.0})
        return opt


class LossPartsLogging:
    """Trainer mixin: the loss's parts (ce, soft, hidden), averaged since the last log line."""

    reported = ("ce", "soft")
    """The parts whose last logged value the run's info carries (`final_ce`, `final_soft`)."""
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


def hold_kd(trainer: Any, kd: Any, projections: Any, layer_pairs: list[tuple[int, int]] | None
            ) -> None:
    """What the KD and GKD trainers hold: the KD settings, the hidden-state projections (on the
    student's device, trained with it) and their layer pairs, and the loss parts to log."""
    trainer.kd, trainer.projections, trainer.pairs = kd, projections, layer_pairs or []
    trainer._parts = defaultdict(list)
    if projections is not None:
        projections.to(trainer.args.device)


def student_outputs(model: Any, inputs: dict[str, Any], hidden: bool) -> Any:
    """The student's forward pass on a KD / GKD batch (hidden states when a layer loss needs
    them; no KV cache in training)."""
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                 output_hidden_states=hidden, use_cache=False)


def completion_logits(model: Any, inputs: dict[str, Any], hidden: bool, compact: bool
                      ) -> tuple[Any, Any]:
    """The student's logits at the completion positions (`inputs["pos"]`, `[B, C, V]`) and its
    outputs; with `compact` only those positions go through the LM head (`distill.train.head`)."""
    return logits_at(model, inputs["pos"], compact=compact, input_ids=inputs["input_ids"],
                     attention_mask=inputs["attention_mask"], output_hidden_states=hidden,
                     use_cache=False)


def xtok_loss(logits: Any, inputs: dict[str, Any], kd: Any, beta: float) -> tuple[KDLoss, Any]:
    """alpha * CE + (1 - alpha) * (T^2 * D(aligned top-k) + uld_weight * ULD), across tokenizers:
    the aligned divergence where a position has a projected target, ULD (sorted-probability L1,
    span scales on both sides) where it has a ULD target; a batch with neither: the CE alone.
    Returns the parts (`soft` 0 without aligned targets) and the ULD term (None without)."""
    t = kd.temperature
    labels = inputs["labels"]
    if "topk_ids" in inputs:
        parts = kd_loss(logits, labels, inputs["topk_logprobs"], inputs["soft_mask"],
                        alpha=kd.alpha, temperature=t, beta=beta,
                        topk_ids=inputs["topk_ids"], topk_valid=inputs["topk_valid"])
    else:  # ULD only: the CE, and a zero soft term
        parts = kd_loss(logits, labels, logits.detach(), inputs["soft_mask"], alpha=1.0,
                        temperature=1.0, beta=0.0)
        parts = KDLoss(loss=kd.alpha * parts.ce, ce=parts.ce, soft=parts.ce * 0)
    u = None
    if "uld_valid" in inputs:
        scale = span_log_scale(torch.log_softmax(logits.float() / t, dim=-1), labels,
                               inputs["span_first"])
        u = uld_topk(logits, inputs["uld_logprobs"], inputs["uld_valid"], labels != -100,
                     temperature=t, student_log_scale=scale,
                     teacher_log_scale=inputs["uld_scale"])
        parts.loss = parts.loss + (1 - kd.alpha) * kd.uld_weight * u
    has_soft = "topk_ids" in inputs and bool((inputs["soft_mask"] & (labels != -100)).any())
    has_uld = u is not None and bool((inputs["uld_valid"].any(-1) & (labels != -100)).any())
    if not (has_soft or has_uld):
        parts.loss = parts.ce
    return parts, u


# --- the trainer --------------------------------------------------------------------------------


class KDTrainer(LossPartsLogging, ProjectionsInOptimizer, BucketedSampling, Trainer):
    """transformers' Trainer (schedule, accumulation, logging, devices) with the KD loss."""

    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by accumulation

    def __init__(self, *args: Any, kd: Any, teacher: Any = None, projections: Any = None,
                 layer_pairs: list[tuple[int, int]] | None = None, vocab: int,
                 xtok: bool = False, compact_head: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        hold_kd(self, kd, projections, layer_pairs)
        self.teacher, self.vocab, self.xtok = teacher, vocab, xtok
        self.compact_head = compact_head
        self.beta = divergence_beta(kd.divergence, kd.beta)
        if teacher is not None:
            teacher.to(self.args.device).eval()

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        hidden = self.projections is not None
        compact = self.compact_head
        logits, out = completion_logits(model, inputs, hidden, compact)
        logits = logits[..., : self.vocab]
        t_out = t_logits = None
        if self.teacher is not None and "teacher_input_ids" in inputs:
            with torch.no_grad():
                t_logits, t_out = logits_at(
                    self.teacher, inputs["teacher_pos"], compact=compact,
                    input_ids=inputs["teacher_input_ids"],
                    attention_mask=inputs["teacher_attention_mask"],
                    output_hidden_states=hidden, use_cache=False)
        if self.xtok and ("uld_valid" in inputs or "topk_ids" in inputs):
            parts, u = xtok_loss(logits, inputs, self.kd, self.beta)
            self._record(ce=parts.ce, soft=parts.soft if "topk_ids" in inputs else None, uld=u)
            return (parts.loss, out) if return_outputs else parts.loss
        if "topk_ids" in inputs:
            parts = kd_loss(logits, inputs["labels"], inputs["topk_logprobs"],
                            inputs["soft_mask"], alpha=self.kd.alpha,
                            temperature=self.kd.temperature, beta=self.beta,
                            topk_ids=inputs["topk_ids"], topk_valid=inputs["topk_valid"])
        elif t_logits is not None:
            parts = kd_loss(logits, inputs["labels"], t_logits[..., : self.vocab],
                            inputs["soft_mask"],
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


def kd_card(cfg: PipelineConfig, info: dict[str, Any]) -> str:
    """The SFT student's model card plus the soft-target settings (KD and GKD)."""
    kd = cfg.train.kd
    card = model_card(cfg, info) + (
        f"- soft targets: {info.get('soft_targets')} (T = {kd.temperature}, "
        f"alpha = {kd.alpha}, divergence = {kd.divergence}"
        + (f", beta = {kd.beta}" if kd.divergence == "jsd" else "")
        + (f", lmbda = {kd.lmbda}" if info.get("method") == "gkd" else "") + ")\n")
    return card + xtok_summary_line(info)


def _sample_strings(rows: list[dict[str, Any]], n: int = 32) -> list[str] | None:
    """Reported top-k strings of a few rows (OpenAI-compatible servers), for `auto`; None when
    the rows carry ids."""
    out = [t for r in rows[:n] for step in (r.get("top_logprobs") or []) for t, _ in step]
    return [t for t in out if isinstance(t, str)] or None


def _resolve_mode(cfg: PipelineConfig, rows: list[dict[str, Any]], tok: Any,
                  teacher_tok: Any) -> Resolved:
    """`kd.cross_tokenizer` → exact | align | uld. With `auto`, integer top-k and no teacher
    tokenizer to compare or spell them: exact, as before (its checks still refuse a mismatch)."""
    kd = cfg.train.kd
    strings = _sample_strings(rows)
    if kd.cross_tokenizer == "auto" and teacher_tok is None and strings is None:
        return "exact"
    return resolve_cross_tokenizer(kd.cross_tokenizer, tok, teacher_tok, strings)


def _xtok_info(mode: str, stats: Any, align_stats: Any) -> dict[str, Any]:
    """The cross-tokenizer record of the train info (manifest, card, report)."""
    summary = align_stats.summary()
    positions = max(align_stats.positions, 1)
    x = {"positions": align_stats.positions,
         "positions_with_target": (0.0 if mode == "uld" else
                                   round((align_stats.one_to_one + align_stats.merged)
                                         / positions, 4)),
         "uld_positions": stats["uld_positions"], "rows_unaligned": stats["rows_unaligned"],
         "teacher_wildcards": stats["teacher_wildcards"]}
    if mode == "align":  # ULD maps no mass onto tokens: it compares sorted distributions
        x |= {k: summary[k] for k in ("one_to_one", "merged", "unaligned", "mass_mapped",
                                      "mass_open", "spans_broken", "unknown", "unknown_chars")}
    return x


def train_kd(cfg: PipelineConfig, run_dir: RunDir | None, rows: list[dict[str, Any]],
             out_dir: Path, *, label: str = "kd",
             callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train a student with soft targets on the sft rows and save it to `out_dir`. Returns the
    same info dict as `train_sft`, plus the soft-target counts and `cross_tokenizer`."""
    cpu_training_memory()
    kd = cfg.train.kd
    rows = join_generations(run_dir, rows)
    ck = Checkpoints(cfg, out_dir, "kd", label, rows)
    if (done := ck.finished()) is not None:
        return done
    source = soft_target_source(cfg, rows)
    tok = load_tokenizer(cfg)
    need_teacher = source == "teacher" or kd.hidden_weight > 0
    teacher, teacher_tok = load_teacher(cfg) if need_teacher else (None, None)
    if teacher_tok is None:
        teacher_tok = load_teacher_tokenizer(cfg)
    mode = _resolve_mode(cfg, rows, tok, teacher_tok)
    if mode == "exact":
        require_shared_vocabulary(cfg, rows, tok, teacher_tok)
    elif kd.hidden_weight > 0:
        raise ConfigError(f"train.kd.hidden_weight: the hidden-state loss pairs teacher and "
                          f"student positions token by token and needs one tokenizer "
                          f"(cross_tokenizer resolved to {mode}); set it to 0")

    model = build_student(cfg, tok)
    n_params = count_params(model)
    vocab = model.get_input_embeddings().num_embeddings
    xtok_info = None
    if mode == "exact":
        if teacher is not None:
            vocab = min(vocab, teacher.get_input_embeddings().num_embeddings)
        examples, stats = kd_training_examples(cfg, rows, tok, source=source, vocab=vocab,
                                               teacher_tok=teacher_tok if need_teacher
                                               else None)
    else:
        if source == "teacher":  # scored once: a frozen teacher gives the same top-k each step
            assert teacher is not None
            prompts, texts = teacher_prompts_and_texts(rows, teacher_tok)
            rows = teacher_scored_rows(rows, teacher, teacher_tok, prompts, texts,
                                       k=cfg.teacher.top_logprobs or 20)
            teacher = None
        examples, stats, align_stats = xtok_training_examples(
            cfg, rows, tok, teacher_tok, mode="uld" if mode == "uld" else "align")
        xtok_info = _xtok_info(mode, stats, align_stats)
    pairs, projections = None, None
    if kd.hidden_weight > 0:
        pairs = layer_pairs(cfg, model, teacher)
        projections = hidden_projections(model, teacher, len(pairs))
    if cfg.train.lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg))

    trainer = KDTrainer(
        model=model,
        args=TrainingArguments(**training_kwargs(cfg, str(ck.root), model, ck),
                               remove_unused_columns=False),
        train_dataset=examples,
        data_collator=KDCollator(tok.pad_token_id,
                                 teacher_tok.pad_token_id
                                 if teacher is not None and teacher_tok is not None
                                 else None),
        callbacks=[*training_callbacks(label), *(callbacks or [])],
        kd=kd, teacher=teacher, projections=projections, layer_pairs=pairs, vocab=vocab,
        xtok=mode != "exact", group_by_length=cfg.train.group_by_length,
        compact_head=cfg.train.compact_head,
    )
    result, train_s = fit(trainer, ck)
    info = {
        "label": label, "method": "kd", "params": n_params, "train_rows": len(examples),
        "steps": trainer.state.global_step, "train_s": train_s,
        "train_loss": result.training_loss, "lora": cfg.train.lora is not None,
        "soft_targets": "stored top-k" if source == "stored" else "teacher logits",
        "top_k": max((e.k for e in examples), default=0) or None,
        "rows_with_soft_targets": (stats["rows_with_soft_targets"]
                                   if source == "stored" or mode != "exact"
                                   else len(examples)),
        "rows_misaligned": stats["rows_misaligned"],
        "rows_truncated": stats["rows_truncated"], "rows_too_long": stats["rows_too_long"],
        "hidden_layers": [list(p) for p in pairs] if pairs else None,
        "world_size": trainer.accelerator.num_processes,
        "cross_tokenizer": mode, "xtok": xtok_info,
    } | history(trainer, result, parts=LossPartsLogging.reported
                + (("uld",) if mode != "exact" else ())) | ck.info()
    save_student(trainer, tok, out_dir, cfg, kd_card(cfg, info))
    ck.done(info)
    return info
