"""The stage table (`distill.stages`): one entry per stage, and everything that lists stages or
their facts (CLI commands, file checks, fingerprints, up-front checks) reads it (issue #22)."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from distill.config import ConfigError, PipelineConfig, load_config, stage_files
from distill.pipeline import input_fingerprint
from distill.preflight import preflight
from distill.records import RunDir
from distill.stages import NAMES, Stage, entry, table

PROMPTS = Path(__file__).resolve().parents[1] / "src" / "distill" / "prompts"


@pytest.fixture()
def project(micro_pipeline: Path, tmp_path: Path) -> tuple[PipelineConfig, RunDir]:
    """The micro project with every kind of file a stage can read named in it."""
    root = micro_pipeline.parent.parent
    shutil.copy(PROMPTS / "judge.j2", root / "prompts" / "judge.j2")
    (root / "data" / "heldout.jsonl").write_text('{"question": "What is 9 + 9?"}\n')
    (root / "data" / "dev.jsonl").write_text('{"question": "1 + 1?", "answer": "2"}\n')
    cfg = load_config(micro_pipeline, [
        "filter.judge.prompt=prompts/judge.j2", "filter.decontaminate.against=[data/heldout.jsonl]",
        "train.dev.dataset=data/dev.jsonl", "export.formats=[merged]"])
    return cfg, RunDir(tmp_path / "run")


def test_every_stage_module_exports_its_entry() -> None:
    for name in NAMES:
        module = importlib.import_module(f"distill.{name}.stage")
        assert isinstance(module.STAGE, Stage), name
        assert module.STAGE is entry(name) and module.STAGE.name == name
        assert module.STAGE.run is module.run
    assert [s.name for s in table()] == list(NAMES)
    with pytest.raises(ValueError, match="unknown stage 'sft'"):
        entry("sft")


def test_cli_has_one_command_per_stage_in_table_order() -> None:
    from distill.cli import app

    stage_commands = [c.name for c in app.registered_commands
                      if (c.callback.__doc__ or "").startswith("Run only the")]
    assert stage_commands == list(NAMES)


def test_listing_the_stages_imports_no_stage_module() -> None:
    """The CLI builds its commands and the config validates `stages:` from the names alone."""
    code = ("import sys, distill.cli, distill.config, distill.stages; "
            "print(sorted(m for m in sys.modules if m.endswith('.stage') or m == 'torch'))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert res.stdout.strip() == "[]"


def test_stages_key_accepts_table_names_only(micro_pipeline: Path) -> None:
    assert load_config(micro_pipeline, ["stages=[filter, export]"]).stages == ["filter", "export"]
    with pytest.raises(ConfigError, match=r"stages\.1"):
        load_config(micro_pipeline, ["stages=[filter, sft]"])


def test_sections_name_config_keys(project: tuple[PipelineConfig, RunDir]) -> None:
    data: dict[str, Any] = project[0].model_dump(mode="json")
    for s in table():
        assert s.sections, s.name
        for key in s.sections:
            node: Any = data
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, (s.name, key)
                node = node[part]


@pytest.mark.parametrize("name", NAMES)
def test_every_input_is_checked_up_front_and_fingerprinted(
        name: str, project: tuple[PipelineConfig, RunDir]) -> None:
    cfg, run = project
    files = stage_files(name, cfg)
    assert files, f"{name}: the project names no file it reads"
    preflight(cfg, [name], "micro.yaml")  # all present: passes
    for field, value in files:
        path = cfg.resolve(value)
        before = input_fingerprint(name, cfg, run)
        with open(path, "a") as fh:
            fh.write("\n")
        assert input_fingerprint(name, cfg, run) != before, (name, field)
        moved = path.rename(path.with_name(path.name + ".moved"))
        try:
            with pytest.raises(ConfigError, match=re.escape(f"micro.yaml: {field}: file not")):
                preflight(cfg, [name], "micro.yaml")
        finally:
            moved.rename(path)
    assert not run.root.exists()


def test_teacher_runtime_settings_rerun_nothing(project: tuple[PipelineConfig, RunDir]) -> None:
    cfg, run = project
    before = {n: input_fingerprint(n, cfg, run) for n in NAMES}
    faster = cfg.model_copy(deep=True)
    faster.teacher.max_concurrency = 3
    faster.teacher.requests_per_minute = 10
    assert {n: input_fingerprint(n, faster, run) for n in NAMES} == before
    other = cfg.model_copy(deep=True)
    other.teacher.model = "another/teacher"
    changed = {n for n in NAMES if input_fingerprint(n, other, run) != before[n]}
    assert changed == {n for n in NAMES if "teacher" in entry(n).sections}
    assert changed == {"generate", "evaluate"}


def test_earlier_outputs_feed_the_fingerprints(project: tuple[PipelineConfig, RunDir]) -> None:
    cfg, run = project
    before = {n: input_fingerprint(n, cfg, run) for n in NAMES}
    for rel in ("generate/generations.jsonl", "sft/sft.jsonl", "student/model.safetensors"):
        (run.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (run.root / rel).write_text("x")
    changed = {n for n in NAMES if input_fingerprint(n, cfg, run) != before[n]}
    assert changed == {"filter", "train", "evaluate", "export"}
