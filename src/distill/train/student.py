"""Loading or building the student model and tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.chat_template import DEFAULT_CHAT_TEMPLATE, ensure_chat_template
from distill.config import ConfigError, PipelineConfig
from distill.train.precision import use_bf16

__all__ = ["DEFAULT_CHAT_TEMPLATE", "build_student", "count_params", "load_tokenizer"]

def _check_dir(name: str, field: str) -> None:
    p = Path(name)
    if (name.startswith((".", "/")) or p.exists()) and not (p / "config.json").exists():
        raise ConfigError(f"{field}: {name}: not a model directory (no config.json)")


def load_tokenizer(cfg: PipelineConfig) -> Any:
    from transformers import AutoTokenizer

    t = cfg.train
    name = t.tokenizer or (t.student if t.student else cfg.teacher.model)
    if not name:
        raise ConfigError("train.tokenizer: no tokenizer (set train.student or train.tokenizer)")
    name = str(cfg.resolve(name)) if cfg.resolve(name).exists() else name
    from distill.teachers.transformers_backend import loading_errors

    with loading_errors(name, "train.student" if t.student and not t.tokenizer
                        else "train.tokenizer"):
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=t.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ensure_chat_template(tok)
    return tok


def build_student(cfg: PipelineConfig, tok: Any) -> Any:
    """A fresh model from `train.student_config`, or pretrained weights: safetensors only and no
    custom code unless `train.allow_pickle` / `train.trust_remote_code` (docs/security.md)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t = cfg.train
    torch.manual_seed(t.seed if t.seed is not None else cfg.seed)
    if t.student_config:
        kw = dict(t.student_config)
        model_type = kw.pop("model_type", None)
        if not model_type:
            raise ConfigError("train.student_config.model_type: required (e.g. llama, qwen2)")
        kw.setdefault("vocab_size", len(tok))
        kw.setdefault("pad_token_id", tok.pad_token_id)
        kw.setdefault("bos_token_id", tok.bos_token_id)
        kw.setdefault("eos_token_id", tok.eos_token_id)
        try:
            config = AutoConfig.for_model(model_type, **kw)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"train.student_config: {err}") from None
        return AutoModelForCausalLM.from_config(config)
    if not t.student:
        raise ConfigError("train.student: empty; set a model directory, hub id or student_config")
    name = str(cfg.resolve(t.student)) if cfg.resolve(t.student).exists() else t.student
    _check_dir(name, "train.student")
    from distill.teachers.transformers_backend import loading_errors, weight_options

    options = weight_options(name, field="train.student", allow_pickle=t.allow_pickle,
                             trust_remote_code=t.trust_remote_code)
    with loading_errors(name, "train.student"):
        return AutoModelForCausalLM.from_pretrained(
            name, **options,
            # bf16 weights only under LoRA: the frozen base needs no fp32 master copy, while full
            # fine-tuning keeps fp32 weights (its updates would round away in bf16) under
            # autocast.
            dtype=torch.bfloat16 if t.lora is not None and use_bf16(cfg) else torch.float32,
        )


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
