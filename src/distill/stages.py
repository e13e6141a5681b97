"""The stages of a pipeline, in order, and what each one is: one table that the CLI, the config
checks, the up-front checks, the fingerprints and the runner all read.

Each stage's entry module, `distill/<name>/stage.py`, describes itself in a module-level
`STAGE = Stage(...)`. The names and their order are written here, once (`StageName`), so that
listing the stages (the CLI builds one command per stage when it starts, the config validates
`stages:`) imports no stage module; `entry(name)` imports one when its facts are first needed.
This module imports nothing of the package at run time, so any module may import it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from distill.config import PipelineConfig, TeacherConfig
    from distill.records import RunDir

StageName = Literal["generate", "filter", "train", "evaluate", "export"]
"""The stages in the order a pipeline runs them (each reads what the earlier ones wrote)."""
NAMES: tuple[StageName, ...] = get_args(StageName)


def _nothing(cfg: PipelineConfig) -> list[Any]:
    return []


@dataclass(frozen=True)
class Stage:
    """What the rest of the package needs to know about a stage, beside running it."""

    name: StageName
    run: Callable[[PipelineConfig, RunDir], dict[str, Any]]
    """Runs the stage on the run directory; returns the results for its manifest entry."""
    sections: tuple[str, ...]
    """The config its output depends on: sections or dotted keys (`generate.prompt`), in the
    order they are hashed into its fingerprint. `teacher` stands for the teacher's identity
    only: its runtime settings (concurrency, rate limits, budgets) change how fast the output
    comes, not what it is, so editing them reruns nothing."""
    inputs: Callable[[PipelineConfig], list[tuple[str, str | None]]] = _nothing
    """(field, path) of the files named in the pipeline file that it reads (a path of None:
    not set). They are checked before anything runs, and their contents are fingerprinted, so
    editing one reruns the stage."""
    reads: tuple[str, ...] = ()
    """What it reads from earlier stages, relative to the run directory, for its fingerprint:
    a file is hashed; a directory (`student/`) or a glob of directories (`student*/`) is signed
    by names, sizes and mtimes (gigabytes of weights are not rehashed on every run)."""
    rows: tuple[str, ...] = ()
    """The row files it writes (`<directory>/<name>.jsonl` beside `<directory>/dataset`) that
    `Pipeline.rows` and `Pipeline.dataset` read, by directory."""
    teachers: Callable[[PipelineConfig], list[tuple[str, TeacherConfig]]] = _nothing
    """(field prefix, config) of each teacher it will call: API keys and model directories are
    checked before the first request."""
    models: Callable[[PipelineConfig], list[tuple[str, str | None, str]]] = _nothing
    """(field, name, kind: "model" or "tokenizer") of each model it loads (name None or "": not
    set): checked to exist, locally or on the Hub, before anything runs."""


def entry(name: str) -> Stage:
    """The table's entry for stage `name` (imports its module: the first call costs an import)."""
    if name not in NAMES:
        raise ValueError(f"unknown stage {name!r} (one of {', '.join(NAMES)})")
    described: Stage = importlib.import_module(f"distill.{name}.stage").STAGE
    return described


def in_order(names: Iterable[str]) -> list[Stage]:
    """The descriptions of `names`, in pipeline order, each once."""
    wanted = set(names)
    return [entry(n) for n in NAMES if n in wanted]


def table() -> list[Stage]:
    """Every stage's description, in pipeline order."""
    return in_order(NAMES)
