"""Runs the stages in order, skips finished ones whose inputs are unchanged, writes the manifest."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from distill.config import ConfigError, PipelineConfig, stage_files
from distill.damage import DiskFull
from distill.records import (
    RunDir,
    atomic_path,
    dir_signature,
    file_fingerprint,
    fingerprint,
    now,
    write_json,
)
from distill.runlock import RunLock
from distill.stages import entry

# The teacher settings that change how fast the outputs come, not what they are: left out of the
# fingerprints (a `teacher` section in `Stage.sections` is the teacher's identity).
_TEACHER_RUNTIME_KEYS = {"max_concurrency", "requests_per_minute", "tokens_per_minute",
                         "timeout_s", "max_retries", "max_cost_usd", "batch_size", "device",
                         "base_url", "api_key_env", "batch_follow_ups", "allow_pickle"}

# How often training checkpoints are written changes nothing a stage produces; nor does
# allowing pickle weights (a run that needed them could not have finished without).
TRAIN_RUNTIME_KEYS = frozenset({"save_steps", "save_minutes", "save_total_limit",
                                "allow_pickle"})

# These two hash what they read from earlier stages before their files, the rest after: the
# order the fingerprints had before the stage table, kept so that finished runs stay finished.
_READS_BEFORE_FILES = frozenset({"filter", "train"})

console = Console(stderr=True)


def _teacher_identity(cfg: PipelineConfig) -> dict[str, Any]:
    data = cfg.teacher.model_dump(mode="json")
    return {k: v for k, v in data.items() if k not in _TEACHER_RUNTIME_KEYS}


def _file_fp(path: Path) -> str:
    return file_fingerprint(path) if path.exists() else "missing"


def _config_part(cfg: PipelineConfig, data: dict[str, Any], key: str) -> Any:
    """The value of a section or dotted key of the config (see `Stage.sections`)."""
    if key == "teacher":
        return _teacher_identity(cfg)
    if key == "train":
        return {k: v for k, v in data["train"].items() if k not in TRAIN_RUNTIME_KEYS}
    node: Any = data
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _read_part(run: RunDir, path: str) -> Any:
    """The signature of an earlier stage's output (see `Stage.reads`)."""
    if not path.endswith("/"):
        return _file_fp(run.root / path)
    name = path.rstrip("/")
    if any(c in name for c in "*?["):
        return [dir_signature(p) for p in sorted(run.root.glob(name))]
    return dir_signature(run.root / name)


def input_fingerprint(stage: str, cfg: PipelineConfig, run: RunDir) -> str:
    """What a stage's output depends on (its `Stage` entry): the config it names, the contents
    of the files it reads (`stage_files`, the list the up-front checks use too) and what it
    reads of the earlier stages' output."""
    s = entry(stage)
    data = cfg.model_dump(mode="json")
    config = [_config_part(cfg, data, key) for key in s.sections]
    files = [_file_fp(cfg.resolve(path)) for _, path in stage_files(stage, cfg)]
    reads = [_read_part(run, path) for path in s.reads]
    if stage in _READS_BEFORE_FILES:
        return fingerprint(stage, *config, *reads, files)
    return fingerprint(stage, *config, files, *reads)


def write_resolved_config(cfg: PipelineConfig, run: RunDir) -> None:
    """The resolved config, for reproducibility. It holds env var *names*, never their values."""
    data = cfg.model_dump(mode="json", exclude={"root"})
    with atomic_path(run.config) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))


def run_stage(stage: str, cfg: PipelineConfig, run: RunDir, *, force: bool = False
              ) -> dict[str, Any]:
    fp = input_fingerprint(stage, cfg, run)
    record = run.manifest()["stages"].get(stage, {})
    if not force and record.get("status") == "done" and record.get("input_fingerprint") == fp:
        console.print(f"[dim]{stage}: up to date, skipped[/dim]")
        return record
    if getattr(cfg, stage, "") is None:  # an optional section (evaluate:, export:) left out
        raise ConfigError(f"{stage}: section missing from the pipeline file")
    console.print(f"[bold cyan]▶ {stage}[/bold cyan]")
    run.update_manifest(stage, fresh=True, status="running", started=now(),
                        input_fingerprint=fp, finished=None, error=None)
    t0 = time.perf_counter()
    try:
        result = entry(stage).run(cfg, run)
    except ConfigError:
        run.update_manifest(stage, status="failed", error="bad input")
        raise
    except BaseException as err:
        with contextlib.suppress(DiskFull):  # no room to record it either: report the cause
            run.update_manifest(stage, status="failed", error=f"{type(err).__name__}: {err}")
        raise
    return run.update_manifest(stage, status="done", finished=now(),
                               seconds=round(time.perf_counter() - t0, 2), **result)


def pending_stages(cfg: PipelineConfig, run: RunDir, stages: list[str], force: bool
                   ) -> list[str]:
    """The stages that will run: from the first one not up to date on (a stage that reruns
    changes what the later ones read)."""
    if force or not run.manifest_path.exists():
        return list(stages)
    done = run.manifest()["stages"]
    for i, stage in enumerate(stages):
        record = done.get(stage, {})
        if record.get("status") != "done" or record.get("input_fingerprint") != \
                input_fingerprint(stage, cfg, run):
            return list(stages[i:])
    return []


def run_pipeline(cfg: PipelineConfig, run: RunDir, stages: list[str] | None = None,
                 force: bool = False, where: str = "pipeline") -> dict[str, Any]:
    """Run `stages` (default: the config's). Bad input found up front (`distill.preflight`)
    raises ConfigError before the run directory is touched."""
    from distill.preflight import preflight

    stages = list(stages or cfg.stages)
    preflight(cfg, pending_stages(cfg, run, stages, force), where)
    with RunLock(run.root):  # before anything is written; a second distill here exits 2
        write_resolved_config(cfg, run)
        m = run.manifest()
        if m.get("name") != cfg.name:
            m["name"] = cfg.name
            write_json(run.manifest_path, m)
        for stage in stages:
            run_stage(stage, cfg, run, force=force)
        from distill.evaluate.report import write_report

        write_report(run)
        return run.manifest()
