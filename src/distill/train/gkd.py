"""On-policy distillation (GKD, Agarwal et al. 2024) with TRL's `GKDTrainer`.

Each optimizer step trains on the student's own samples with probability `kd.lmbda` (on-policy),
else on the curated corpus sequences; the local teacher scores every token of either. TRL does the
sampling, the lmbda mixing and the chat-format collation; this module swaps in our loss so GKD
shares KD's knobs: the divergence (`kd.divergence`, `kd.beta`) at temperature `kd.temperature`
scaled by T^2, plus the optional hidden-state loss. No hard-token CE: on-policy tokens are the
student's own guesses, not labels. `kd.sample_temperature` is the sampling temperature (TRL's
`GKDConfig.temperature`), `kd.max_new_tokens` the sample length.

Teacher and student see the same token ids (the student's chat template), so they must share a
vocabulary; `check_vocab` refuses anything else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl.experimental.gkd import GKDConfig, GKDTrainer

from distill.config import ConfigError, PipelineConfig
from distill.train.checkpoints import Checkpoints
from distill.train.common import (
    check_vocab,
    fit,
    history,
    load_teacher,
    local_teacher_name,
    lora_config,
    save_student,
    training_kwargs,
)
from distill.train.kd import (
    LossPartsLogging,
    ProjectionsInOptimizer,
    hidden_projections,
    hold_kd,
    kd_card,
    layer_loss,
    layer_pairs,
    student_outputs,
)
from distill.train.losses import divergence_beta, generalized_jsd, masked_mean
from distill.train.memory import cpu_training_memory
from distill.train.progress import training_callbacks
from distill.train.student import build_student, count_params, load_tokenizer


class DistillGKDTrainer(LossPartsLogging, ProjectionsInOptimizer, GKDTrainer):
    """TRL's GKDTrainer (on-policy sampling, lmbda mixing) with the shared KD loss."""

    # A per-batch mean: the Trainer divides by accumulation. (TRL's base class types it None.)
    loss_is_scaled_for_ga = False  # type: ignore[assignment]

    def __init__(self, *args: Any, kd: Any, projections: Any = None,
                 layer_pairs: list[tuple[int, int]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        hold_kd(self, kd, projections, layer_pairs)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        hidden = self.projections is not None
        out = student_outputs(model, inputs, hidden)
        self.teacher_model.eval()
        with torch.no_grad():
            t_out = self.teacher_model(input_ids=inputs["input_ids"],
                                       attention_mask=inputs["attention_mask"],
                                       output_hidden_states=hidden, use_cache=False)
        # Logits at i predict token i + 1; labels are -100 on prompt and padding.
        mask = inputs["labels"][:, 1:] != -100
        v = min(out.logits.size(-1), t_out.logits.size(-1))
        t = self.kd.temperature
        d = generalized_jsd(out.logits[:, :-1, :v], t_out.logits[:, :-1, :v], self.beta, t)
        soft = masked_mean(d, mask)
        loss, h = t**2 * soft, None
        if hidden:
            h = layer_loss(self.kd, self.pairs, self.projections,
                           tuple(x[:, :-1] for x in out.hidden_states),
                           tuple(x[:, :-1] for x in t_out.hidden_states), None, None, mask)
            loss = loss + self.kd.hidden_weight * h
        self._record(soft=soft, hidden=h)
        return (loss, out) if return_outputs else loss


def train_gkd(cfg: PipelineConfig, rows: list[dict[str, Any]], out_dir: Path, *,
              label: str = "gkd", callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train a student on-policy against the local teacher; save it like the SFT student."""
    cpu_training_memory()
    kd = cfg.train.kd
    if local_teacher_name(cfg) is None:
        raise ConfigError("train.method gkd: GKD scores the student's samples with a local "
                          "teacher; set train.kd.teacher_model or use teacher.backend: "
                          "transformers")
    ck = Checkpoints(cfg, out_dir, "gkd", label, rows)
    if (done := ck.finished()) is not None:
        return done
    tok = load_tokenizer(cfg)
    teacher, teacher_tok = load_teacher(cfg)
    check_vocab(tok, teacher_tok, local_teacher_name(cfg) or "teacher")
    model = build_student(cfg, tok)
    n_params = count_params(model)
    pairs, projections = None, None
    if kd.hidden_weight > 0:
        pairs = layer_pairs(cfg, model, teacher)
        projections = hidden_projections(model, teacher, len(pairs))
    data = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    args = GKDConfig(
        **training_kwargs(cfg, str(ck.root), model, ck), remove_unused_columns=False,
        max_length=cfg.train.max_length, packing=False,
        lmbda=kd.lmbda, beta=divergence_beta(kd.divergence, kd.beta),
        temperature=kd.sample_temperature,
        max_new_tokens=kd.max_new_tokens or cfg.generate.max_tokens,
    )
    try:
        trainer = DistillGKDTrainer(
            model=model, teacher_model=teacher, args=args, train_dataset=data,
            processing_class=tok, peft_config=lora_config(cfg),
            callbacks=[*training_callbacks(label), *(callbacks or [])],
            kd=kd, projections=projections, layer_pairs=pairs,
        )
    except ValueError as err:  # e.g. TRL's vocab_size check
        raise ConfigError(f"train.method gkd: {err}") from None
    result, train_s = fit(trainer, ck)
    info = {
        "label": label, "method": "gkd", "params": n_params, "train_rows": len(rows),
        "steps": trainer.state.global_step, "train_s": train_s,
        "train_loss": result.training_loss, "lora": cfg.train.lora is not None,
        "soft_targets": "teacher logits (on-policy)", "lmbda": kd.lmbda,
        "hidden_layers": [list(p) for p in pairs] if pairs else None,
        "world_size": trainer.accelerator.num_processes,
    } | history(trainer, result, parts=LossPartsLogging.reported) | ck.info()
    save_student(trainer, tok, out_dir, cfg, kd_card(cfg, info))
    ck.done(info)
    return info
