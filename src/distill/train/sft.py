"""Supervised fine-tuning on the `messages` set with TRL's SFTTrainer (+ optional PEFT LoRA).

Loss is on the assistant turn only: each conversation becomes a conversational prompt/completion
pair, so TRL masks the prompt tokens whatever the chat template (no `{% generation %}` markers
needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from distill.config import PipelineConfig
from distill.train.checkpoints import Checkpoints
from distill.train.common import (
    fit,
    history,
    lora_config,
    model_card,
    save_student,
    training_kwargs,
)
from distill.train.head import masked_logits, next_token_mask
from distill.train.memory import cpu_training_memory
from distill.train.progress import training_callbacks
from distill.train.sampler import BucketedSampling
from distill.train.student import build_student, count_params, load_tokenizer


class DistillSFTTrainer(BucketedSampling, SFTTrainer):
    """TRL's SFTTrainer, with `train.group_by_length` batches (`distill.train.sampler`) and, with
    `compact_head`, the LM head and the loss at the completion positions only
    (`distill.train.head`): TRL's CPU path projects and scores every position of the batch."""

    def __init__(self, *args: Any, compact_head: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.compact_head = compact_head

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if not self.compact_head or return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        keep, targets = next_token_mask(inputs["labels"])
        fwd = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
        logits = masked_logits(model, keep, use_cache=False, **fwd).float()
        # As TRL's own loss: summed over the labelled tokens, divided by their count across
        # the accumulated micro-batches (and devices), so accumulation and DDP weigh tokens
        # alike.
        n = targets.numel() if num_items_in_batch is None else num_items_in_batch
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        loss = loss / torch.as_tensor(n, device=loss.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        with torch.no_grad():
            hits = (logits.argmax(-1) == targets).sum()
            valid = self.accelerator.gather_for_metrics(targets.new_tensor(targets.numel())).sum()
            hits = self.accelerator.gather_for_metrics(hits).sum()
            self._metrics["train"]["mean_token_accuracy"].append(
                (hits / valid).item() if valid > 0 else 0.0)
        return loss


_NOT_MODEL_INPUTS = ("labels", "completion_mask", "assistant_masks")


def to_prompt_completion(messages_ds: Dataset) -> Dataset:
    """[..., user, assistant] → {prompt: [..., user], completion: [assistant]}."""

    def split(row: dict[str, Any]) -> dict[str, Any]:
        msgs = row["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return {"prompt": msgs[:last], "completion": [msgs[last]]}

    return messages_ds.map(split, remove_columns=messages_ds.column_names)


def sft_args(cfg: PipelineConfig, output_dir: str, model: Any = None,
             checkpoints: Checkpoints | None = None) -> SFTConfig:
    """The shared schedule (`training_kwargs`) plus SFT's sequence length and packing."""
    return SFTConfig(**training_kwargs(cfg, output_dir, model, checkpoints),
                     max_length=cfg.train.max_length, packing=cfg.train.packing)


def make_sft_trainer(cfg: PipelineConfig, tok: Any, model: Any, dataset: Dataset, work: Path,
                     *, label: str = "student", callbacks: list[Any] | None = None,
                     checkpoints: Checkpoints | None = None) -> Any:
    """The SFT trainer for `dataset` (a `messages` column), writing scratch files to `work`
    (with `checkpoints`: to its directory, at its cadence)."""
    cpu_training_memory()
    return DistillSFTTrainer(
        model=model, group_by_length=cfg.train.group_by_length,
        compact_head=cfg.train.compact_head,
        args=sft_args(cfg, str(work), model, checkpoints),
        train_dataset=to_prompt_completion(dataset),
        processing_class=tok,
        peft_config=lora_config(cfg),
        callbacks=[*training_callbacks(label), *(callbacks or [])],
    )


def train_sft(cfg: PipelineConfig, dataset: Dataset, out_dir: Path, *, label: str = "student",
              callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train a student on `dataset` (a `messages` column) and save it to `out_dir` atomically.

    With LoRA, `out_dir/adapter/` holds the adapter and `out_dir/` the merged model, so every
    later stage loads a plain transformers model.
    """
    ck = Checkpoints(cfg, out_dir, "sft", label, dataset)
    if (done := ck.finished()) is not None:
        return done
    tok = load_tokenizer(cfg)
    model = build_student(cfg, tok)
    n_params = count_params(model)
    trainer = make_sft_trainer(cfg, tok, model, dataset, ck.root, label=label,
                               callbacks=callbacks, checkpoints=ck)
    result, train_s = fit(trainer, ck)
    info = {
        "label": label, "params": n_params, "train_rows": len(dataset),
        "steps": trainer.state.global_step, "train_s": train_s,
        "train_loss": result.training_loss, "lora": cfg.train.lora is not None,
        "world_size": trainer.accelerator.num_processes,
    } | history(trainer, result) | ck.info()
    save_student(trainer, tok, out_dir, cfg, model_card(cfg, info))
    ck.done(info)
    return info
