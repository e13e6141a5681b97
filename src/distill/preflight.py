"""Checks that run before any stage: bad input costs nothing and changes nothing.

Every problem found here is a `ConfigError` (exit 2, one line naming the file and field) raised
before the run directory is touched and before any request is sent. What each stage reads from
disk is listed once, in `stage_files`; the same list feeds these checks and the stage
fingerprints (`distill.pipeline.input_fingerprint`), so editing a file a stage reads reruns it.
"""

from __future__ import annotations

import os
from pathlib import Path

from distill.config import ConfigError, PipelineConfig, TeacherConfig, check_files


def check_sections(cfg: PipelineConfig, stages: list[str], where: str) -> None:
    """A stage that needs a section the file does not have is an error, not a guessed default
    (a pipeline without `train:` used to try to download a default student)."""
    if "train" in stages and "train" not in cfg.model_fields_set:
        raise ConfigError(f"{where}: train: section missing (stage 'train' needs train.student "
                          "or train.student_config); add it, or list the stages to run in "
                          "`stages:`")
    if "train" in stages and not (cfg.train.student or cfg.train.student_config):
        raise ConfigError(f"{where}: train.student: empty; set a model directory or hub id, or "
                          "train.student_config")
    for stage in ("evaluate", "export"):
        if stage in stages and getattr(cfg, stage) is None:
            raise ConfigError(f"{where}: {stage}: section missing (stage '{stage}' is listed "
                              "in `stages:`)")


def teacher_calls(cfg: PipelineConfig, stages: list[str]) -> list[tuple[str, TeacherConfig]]:
    """The teachers the given stages will call: (field prefix, config)."""
    out: list[tuple[str, TeacherConfig]] = []
    if "generate" in stages and not cfg.generate.source:
        out.append(("teacher", cfg.teacher))
    if "filter" in stages and cfg.filter.judge is not None:
        judge = cfg.filter.judge.teacher
        out.append(("filter.judge.teacher", judge) if judge is not None
                   else ("teacher", cfg.teacher))
    if "evaluate" in stages and cfg.evaluate is not None and cfg.evaluate.evaluate_teacher:
        out.append(("teacher", cfg.teacher))
    return out


def check_api_key(field: str, t: TeacherConfig) -> None:
    """A key variable the user named must be set; the default one only for remote servers."""
    if t.backend != "openai" or not t.api_key_env or os.environ.get(t.api_key_env):
        return
    from distill.teachers.openai_backend import read_api_key

    if "api_key_env" in t.model_fields_set:
        raise ConfigError(f"{field}.api_key_env: environment variable {t.api_key_env} is not "
                          "set; nothing was sent")
    urls = t.base_url if isinstance(t.base_url, list) else [t.base_url or
                                                             "https://api.openai.com/v1"]
    read_api_key(t, urls)  # raises for a remote server


_MARKERS = {"model": ("config.json",),
            "tokenizer": ("tokenizer_config.json", "tokenizer.json", "config.json")}


def check_model(field: str, name: str, kind: str = "model") -> None:
    """A local model (or tokenizer) directory, or a hub id that is cached or reachable: said at
    once, with no retry storm (HF_HUB_OFFLINE is respected)."""
    path = Path(name)
    if path.is_dir() or name.startswith((".", "/", "~")):
        if not any((path / m).is_file() for m in _MARKERS[kind]):
            raise ConfigError(f"{field}: {name}: not a {kind} directory (no "
                              f"{' or '.join(_MARKERS[kind])})")
        return
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(name, m), str) for m in _MARKERS[kind]):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConfigError(f"{field}: {name}: not a local directory and not in the Hugging Face "
                          "cache (HF_HUB_OFFLINE is set)")
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(name, timeout=10)
    except Exception as err:  # noqa: BLE001 - any failure means we cannot load it
        raise ConfigError(f"{field}: {name}: not a local directory, and the Hub cannot serve it "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None


def check_models(cfg: PipelineConfig, stages: list[str]) -> None:
    for field, t in teacher_calls(cfg, stages):
        if t.backend in ("transformers", "vllm"):
            check_model(f"{field}.model", t.model)
    if any(s in stages for s in ("train", "evaluate")) and cfg.train.student:
        check_model("train.student", cfg.train.student)
    if "train" in stages and cfg.train.tokenizer:
        check_model("train.tokenizer", cfg.train.tokenizer, "tokenizer")


def preflight(cfg: PipelineConfig, stages: list[str], where: str = "pipeline") -> None:
    """Everything that can be known wrong before a stage runs. `where` names the file."""
    check_sections(cfg, stages, where)
    check_files(cfg, stages, where)  # again: a config built in Python skipped load_config
    if "evaluate" in stages and cfg.evaluate is not None and cfg.evaluate.harness is not None:
        from distill.evaluate.harness import check_available

        check_available()  # lm-eval missing: said now, not after generate and train
    for field, t in teacher_calls(cfg, stages):
        check_api_key(field, t)
    check_models(cfg, stages)
