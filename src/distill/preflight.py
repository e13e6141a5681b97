"""Checks that run before any stage: bad input costs nothing and changes nothing.

Every problem found here is a `ConfigError` (exit 2, one line naming the file and field) raised
before the run directory is touched and before any request is sent. What each stage reads from
disk, which teachers it calls and which models it loads is said once, in its entry of the
stage table (`distill.stages`); the files a stage reads feed these checks and its fingerprint
(`distill.pipeline.input_fingerprint`) alike, so editing a file a stage reads reruns it.
"""

from __future__ import annotations

import os
from pathlib import Path

from distill.config import ConfigError, PipelineConfig, TeacherConfig, check_files
from distill.stages import in_order


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
    for stage in in_order(stages):
        if getattr(cfg, stage.name, "") is None:  # an optional section (evaluate:, export:)
            raise ConfigError(f"{where}: {stage.name}: section missing (stage '{stage.name}' "
                              "is listed in `stages:`)")


def teacher_calls(cfg: PipelineConfig, stages: list[str]) -> list[tuple[str, TeacherConfig]]:
    """The teachers the given stages will call: (field prefix, config), each field once."""
    calls = {field: t for s in in_order(stages) for field, t in s.teachers(cfg)}
    return list(calls.items())


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
    """The local teachers' models, then the models the stages load (each field once)."""
    for field, t in teacher_calls(cfg, stages):
        if t.backend in ("transformers", "vllm"):
            check_model(f"{field}.model", t.model)
    models = {field: (name, kind) for s in in_order(stages) for field, name, kind in s.models(cfg)}
    for field, (name, kind) in models.items():
        if name:
            check_model(field, name, kind)


def preflight(cfg: PipelineConfig, stages: list[str], where: str = "pipeline") -> None:
    """Everything that can be known wrong before a stage runs. `where` names the file."""
    check_sections(cfg, stages, where)
    check_files(cfg, stages, where)  # again: a config built in Python skipped load_config
    if "evaluate" in stages and cfg.evaluate is not None and cfg.evaluate.harness is not None:
        from distill.evaluate.harness import check_available

        check_available()  # lm-eval missing: said now, not after generate and train
    if cfg.executor.kind == "ray":  # Ray missing, or work a shard cannot do: said now
        from distill.executor import check_executor

        check_executor(cfg, stages)
    for field, t in teacher_calls(cfg, stages):
        check_api_key(field, t)
    check_models(cfg, stages)
