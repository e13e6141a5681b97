"""Teacher backends behind one protocol (`base.Teacher`); heavy imports happen lazily."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.config import ConfigError, TeacherConfig
from distill.teachers.base import Teacher


def make_teacher(cfg: TeacherConfig, *, batch_record: Path | None = None, **kwargs: Any
                 ) -> Teacher:
    """The backend `cfg` names. `batch_record`: where a stage that can wait for the Batch API
    keeps its batch ids (`teacher.batch`); without it (judge, evaluate) requests go online.
    `kwargs` go to the backend (e.g. `require_logprobs`, or a loaded `model` and `tokenizer`
    for transformers)."""
    if cfg.backend == "openai" and cfg.batch and batch_record is not None:
        from distill.teachers.batch import BatchTeacher

        return BatchTeacher(cfg, record_path=batch_record, **kwargs)
    if cfg.backend == "transformers":
        from distill.teachers.transformers_backend import TransformersTeacher

        return TransformersTeacher(cfg, **kwargs)
    if cfg.backend == "openai":
        from distill.teachers.openai_backend import OpenAITeacher

        return OpenAITeacher(cfg, **kwargs)
    if cfg.backend == "vllm":
        from distill.teachers.vllm_backend import VLLMTeacher

        return VLLMTeacher(cfg, **kwargs)
    raise ConfigError(f"teacher.backend: unknown backend {cfg.backend!r}")
