"""The Python API: what `distill run` does, for notebooks and scripts.

    from distill import Pipeline
    p = Pipeline.from_yaml("pipelines/demo.yaml", overrides=["generate.max_tokens=128"])
    p.run(stages=["generate", "filter"])
    ds = p.dataset("filter")          # a datasets.Dataset, every row with keep/drop_reason

A config can be built in Python too (`PipelineConfig(name=..., seeds=SeedsConfig(...))`):
relative paths then resolve against `root` (default: the working directory). Bad input raises
`ConfigError` before anything runs, as the CLI's exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.config import (
    ConfigError,
    PipelineConfig,
    check_files,
    load_config,
    resolve_model_paths,
)
from distill.records import RunDir
from distill.stages import NAMES, table


def _row_files() -> dict[str, str]:
    """Directory → its row file, of what `dataset()` / `rows()` read (`Stage.rows`: generate,
    filter, and sft: the training set)."""
    return {Path(path).parent.name: Path(path).name for s in table() for path in s.rows}


class Pipeline:
    """One pipeline and its run directory (default `runs/<name>`, relative to the working
    directory, as with the CLI)."""

    def __init__(self, config: PipelineConfig, run_dir: str | Path | None = None) -> None:
        check_files(config, config.stages, f"pipeline {config.name!r}")
        resolve_model_paths(config)
        self.config = config
        self.run_dir = RunDir(Path(run_dir) if run_dir else Path("runs") / config.name)
        self._where = f"pipeline {config.name!r}"

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None,
                  run_dir: str | Path | None = None) -> Pipeline:
        """Load a pipeline file; `overrides` are `--set` strings (`key.path=value`)."""
        p = cls(load_config(path, overrides or []), run_dir)
        p._where = str(path)
        return p

    def run(self, stages: list[str] | None = None, force: bool = False) -> dict[str, Any]:
        """Run `stages` (default: the config's), skipping finished, unchanged ones unless
        `force`; returns the manifest."""
        from distill.pipeline import run_pipeline

        unknown = [s for s in stages or [] if s not in NAMES]
        if unknown:
            raise ConfigError(f"stages: unknown stage {unknown[0]!r}")
        return run_pipeline(self.config, self.run_dir, stages=stages, force=force,
                            where=self._where)

    def dataset(self, stage: str = "filter") -> Any:
        """A stage's rows as a `datasets.Dataset` (generate, filter, or sft: the training set)."""
        from datasets import load_from_disk

        path = self._output(stage)[0] / "dataset"
        return load_from_disk(str(path))

    def rows(self, stage: str = "filter") -> list[dict[str, Any]]:
        """A stage's rows as dicts (JSON columns such as `scores` decoded)."""
        from distill.io import read_stage_rows

        directory, name = self._output(stage)
        return read_stage_rows(directory, name)

    def metrics(self) -> dict[str, Any]:
        """The evaluate stage's `metrics.json`."""
        import json

        path = self.run_dir.stage("evaluate") / "metrics.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found (run the evaluate stage first)")
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def manifest(self) -> dict[str, Any]:
        return self.run_dir.manifest()

    def _output(self, stage: str) -> tuple[Path, str]:
        outputs = _row_files()
        if stage not in outputs:
            raise ConfigError(f"stage {stage!r}: has no rows to read (one of "
                              f"{', '.join(outputs)})")
        name = outputs[stage]
        path = self.run_dir.stage(stage)
        if not path.is_dir():
            raise ConfigError(f"{path}: not found (run the {stage} stage first)")
        return path, name
