"""Supervised fine-tuning on the `messages` set with TRL's SFTTrainer (+ optional PEFT LoRA).

Loss is on the assistant turn only: each conversation becomes a conversational prompt/completion
pair, so TRL masks the prompt tokens whatever the chat template (no `{% generation %}` markers
needed).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from distill.config import PipelineConfig
from distill.train.common import (
    fit,
    history,
    lora_config,
    model_card,
    save_student,
    training_kwargs,
)
from distill.train.memory import cpu_training_memory
from distill.train.progress import training_callbacks
from distill.train.sampler import BucketedSampling
from distill.train.student import build_student, count_params, load_tokenizer


class DistillSFTTrainer(BucketedSampling, SFTTrainer):
    """TRL's SFTTrainer, with `train.group_by_length` batches (`distill.train.sampler`)."""


def to_prompt_completion(messages_ds: Dataset) -> Dataset:
    """[..., user, assistant] → {prompt: [..., user], completion: [assistant]}."""

    def split(row: dict[str, Any]) -> dict[str, Any]:
        msgs = row["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return {"prompt": msgs[:last], "completion": [msgs[last]]}

    return messages_ds.map(split, remove_columns=messages_ds.column_names)


def sft_args(cfg: PipelineConfig, output_dir: str) -> SFTConfig:
    """The shared schedule (`training_kwargs`) plus SFT's sequence length and packing."""
    return SFTConfig(**training_kwargs(cfg, output_dir), max_length=cfg.train.max_length,
                     packing=cfg.train.packing)


def make_sft_trainer(cfg: PipelineConfig, tok: Any, model: Any, dataset: Dataset, work: Path,
                     *, label: str = "student", callbacks: list[Any] | None = None) -> Any:
    """The SFT trainer for `dataset` (a `messages` column), writing scratch files to `work`."""
    cpu_training_memory()
    return DistillSFTTrainer(
        model=model, group_by_length=cfg.train.group_by_length,
        args=sft_args(cfg, str(work)),
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
    tok = load_tokenizer(cfg)
    model = build_student(cfg, tok)
    n_params = count_params(model)
    with tempfile.TemporaryDirectory(prefix="distill-train-", ignore_cleanup_errors=True) as work:
        trainer = make_sft_trainer(cfg, tok, model, dataset, Path(work), label=label,
                                   callbacks=callbacks)
        result, train_s = fit(trainer)
        info = {
            "label": label, "params": n_params, "train_rows": len(dataset),
            "steps": trainer.state.global_step, "train_s": train_s,
            "train_loss": result.training_loss, "lora": cfg.train.lora is not None,
            "world_size": trainer.accelerator.num_processes,
        } | history(trainer, result)
        save_student(trainer, tok, out_dir, cfg, model_card(cfg, info))
        return info
