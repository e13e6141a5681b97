"""Saving a trained student: merged weights, the tokenizer with its chat template, a model card.

Shared by the SFT, KD and GKD paths, so every student directory loads the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.chat_template import ensure_chat_template
from distill.config import PipelineConfig
from distill.records import atomic_path


def restore_inference_config(model: Any) -> None:
    """Undo what training set for itself: transformers' Trainer writes `args.use_cache` (False)
    into the model config, and a student saved that way generates without a KV cache."""
    config = getattr(model, "config", None)
    if config is None:
        return
    config.use_cache = True
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text.use_cache = True


def save_tokenizer(tok: Any, out_dir: Path) -> None:
    """The tokenizer with the chat template the student was trained on (the default one for a
    base tokenizer), so evaluate, export and `distill chat` render prompts exactly as training."""
    ensure_chat_template(tok)
    tok.save_pretrained(out_dir)


def save_student_dir(trainer: Any, tok: Any, out_dir: Path, cfg: PipelineConfig,
                     card: str) -> None:
    """Merged weights in `out_dir` (the LoRA adapter in `out_dir/adapter/`), atomically.

    Under `accelerate launch` the main process saves; FSDP-sharded weights are gathered first (a
    collective: every process makes the call)."""
    from distill.train.student import build_student

    acc = trainer.accelerator
    state = acc.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if not acc.is_main_process:
        return
    with atomic_path(out_dir) as tmp:
        final = trainer.model
        if cfg.train.lora is not None:
            final.save_pretrained(tmp / "adapter", safe_serialization=True, state_dict=state)
            if state is not None:  # sharded in memory: merge into a fresh base copy
                from peft import PeftModel

                final = PeftModel.from_pretrained(build_student(cfg, tok), tmp / "adapter")
                state = None
            final = final.merge_and_unload()
        restore_inference_config(final)
        final.save_pretrained(tmp, safe_serialization=True, state_dict=state)
        save_tokenizer(tok, tmp)
        (tmp / "README.md").write_text(card)
