"""Teacher backends behind one protocol (`base.Teacher`); heavy imports happen lazily."""

from __future__ import annotations

from typing import Any

from distill.config import ConfigError, TeacherConfig


def make_teacher(cfg: TeacherConfig, **kwargs: Any) -> Any:
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
