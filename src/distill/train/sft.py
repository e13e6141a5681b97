"""Supervised fine-tuning on the `messages` set with TRL's SFTTrainer (+ optional PEFT LoRA).

Loss is on the assistant turn only: each conversation becomes a conversational prompt/completion
pair, so TRL masks the prompt tokens whatever the chat template (no `{% generation %}` markers
needed).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from datasets import Dataset

from distill.config import PipelineConfig
from distill.train.saving import save_student_dir
from distill.train.student import build_student, count_params, load_tokenizer


def to_prompt_completion(messages_ds: Dataset) -> Dataset:
    """[..., user, assistant] → {prompt: [..., user], completion: [assistant]}."""

    def split(row: dict[str, Any]) -> dict[str, Any]:
        msgs = row["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return {"prompt": msgs[:last], "completion": [msgs[last]]}

    return messages_ds.map(split, remove_columns=messages_ds.column_names)


def sft_args(cfg: PipelineConfig, output_dir: str) -> Any:
    import torch
    from trl import SFTConfig

    t = cfg.train
    return SFTConfig(
        output_dir=output_dir,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_length=t.max_length,
        packing=t.packing,
        logging_steps=t.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=t.seed if t.seed is not None else cfg.seed,
        bf16=t.bf16,
        activation_checkpointing=t.gradient_checkpointing,  # the new name of gradient_checkpointing
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def sft_trainer_class() -> Any:
    """TRL's SFTTrainer, with `train.group_by_length` batches (`distill.train.sampler`)."""
    from trl import SFTTrainer

    from distill.train.sampler import BucketedSampling

    class DistillSFTTrainer(BucketedSampling, SFTTrainer):
        pass

    return DistillSFTTrainer


def peft_config(cfg: PipelineConfig) -> Any:
    if cfg.train.lora is None:
        return None
    from peft import LoraConfig

    lo = cfg.train.lora
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                      target_modules=lo.target_modules, task_type="CAUSAL_LM")


def make_sft_trainer(cfg: PipelineConfig, tok: Any, model: Any, dataset: Dataset, work: Path,
                     *, label: str = "student", callbacks: list[Any] | None = None) -> Any:
    """The SFT trainer for `dataset` (a `messages` column), writing scratch files to `work`."""
    from distill.train.memory import cpu_training_memory
    from distill.train.progress import training_callbacks

    cpu_training_memory()

    return sft_trainer_class()(
        model=model, group_by_length=cfg.train.group_by_length,
        args=sft_args(cfg, str(work)),
        train_dataset=to_prompt_completion(dataset),
        processing_class=tok,
        peft_config=peft_config(cfg),
        callbacks=[*training_callbacks(label), *(callbacks or [])],
    )


def train_sft(cfg: PipelineConfig, dataset: Dataset, out_dir: Path, *, label: str = "student",
              callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train a student on `dataset` (a `messages` column) and save it to `out_dir` atomically.

    With LoRA, `out_dir/adapter/` holds the adapter and `out_dir/` the merged model, so every
    later stage loads a plain transformers model.
    """
    from distill.train.progress import quiet_trainer

    tok = load_tokenizer(cfg)
    model = build_student(cfg, tok)
    n_params = count_params(model)
    work = Path(tempfile.mkdtemp(prefix="distill-train-"))
    try:
        trainer = make_sft_trainer(cfg, tok, model, dataset, work, label=label,
                                   callbacks=callbacks)
        t0 = time.perf_counter()
        result = quiet_trainer(trainer).train()
        train_s = time.perf_counter() - t0
        history = [h for h in trainer.state.log_history if "loss" in h]
        acc = trainer.accelerator
        info = {
            "label": label, "params": n_params, "train_rows": len(dataset),
            "steps": trainer.state.global_step, "train_s": round(train_s, 2),
            "final_loss": history[-1]["loss"] if history else result.training_loss,
            "train_loss": result.training_loss, "lora": cfg.train.lora is not None,
            "loss_history": [(h["step"], h["loss"]) for h in history],
            "world_size": acc.num_processes,
        }
        save_student_dir(trainer, tok, out_dir, cfg, model_card(cfg, info))
        acc.wait_for_everyone()
        return info
    finally:
        shutil.rmtree(work, ignore_errors=True)


def model_card(cfg: PipelineConfig, info: dict[str, Any]) -> str:
    base = cfg.train.student or f"fresh {cfg.train.student_config.get('model_type')} (from config)"
    return (
        f"---\nlibrary_name: transformers\ntags: [distill, sft]\n---\n\n"
        f"# {cfg.name} — {info['label']}\n\n"
        f"Trained by `distill` ({cfg.train.method}) from `{base}` on {info['train_rows']} rows "
        f"of the pipeline's curated set, {info['steps']} optimizer steps "
        f"in {info['train_s']} s.\n\n"
        f"- parameters: {info['params']:,}\n- LoRA: {info['lora']}\n"
        f"- final training loss: {info['final_loss']}\n"
    )
