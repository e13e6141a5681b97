"""A user's install: the wheel (not editable) in a fresh venv, run from an empty folder with a
pipeline file that names no template; `distill init`; the Python API (issue #16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from distill.api import Pipeline
from distill.config import ConfigError, PipelineConfig, SeedsConfig, TeacherConfig
from distill.init import init_project
from tests.conftest import MICRO_SEEDS

ROOT = Path(__file__).resolve().parents[1]


def _minimal_pipeline(folder: Path, teacher: Path) -> Path:
    (folder / "questions.jsonl").write_text("".join(json.dumps(s) + "\n" for s in MICRO_SEEDS))
    path = folder / "mine.yaml"
    path.write_text(f"""
name: mine
seeds: {{path: questions.jsonl}}
teacher: {{backend: transformers, model: {teacher}, batch_size: 8}}
generate: {{max_tokens: 48, temperature: 0.5}}
filter: {{verify: true, dedup: {{exact: true, near: true}}}}
stages: [generate, filter]
""")
    return path


@pytest.mark.slow
def test_wheel_runs_generate_and_filter_from_an_empty_folder(tmp_path: Path, tiny_teacher: Path
                                                              ) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True,
                   capture_output=True, timeout=300)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    *map(str, wheels.glob("distill-*.whl"))], check=True, capture_output=True,
                   timeout=300)
    # Dependencies come from this venv's site-packages, appended after the fresh venv's own
    # (a path in a .pth file: its own .pth files, the editable distill among them, stay off).
    fresh_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                 "['purelib'])"], capture_output=True, text=True, check=True
                                ).stdout.strip()
    Path(fresh_site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "empty"
    work.mkdir()
    pipeline = _minimal_pipeline(work, tiny_teacher)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(py), "-c", "import distill.prompts as p; print(p.__file__)"],
                           cwd=work, capture_output=True, text=True, env=env, check=True)
    assert where.stdout.startswith(fresh_site), where.stdout  # the wheel, not the checkout
    res = subprocess.run([str(venv / "bin" / "distill"), "run", str(pipeline)], cwd=work,
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((work / "runs" / "mine" / "manifest.json").read_text())
    assert manifest["stages"]["generate"]["rows"] == len(MICRO_SEEDS)
    assert manifest["stages"]["filter"]["kept"] >= 1
    assert "Loading weights" not in res.stderr  # third-party bars are off without -v


def test_init_writes_a_pipeline_that_validates(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from distill.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["init", str(tmp_path / "proj"), "--prompts"])
    assert res.exit_code == 0, res.output
    proj = tmp_path / "proj"
    text = (proj / "pipeline.yaml").read_text()
    assert "prompt: prompts/cot.j2" in text and (proj / "prompts" / "judge.j2").is_file()
    assert (proj / "data" / "seeds.jsonl").is_file() and (proj / "data" / "eval.jsonl").is_file()
    res = runner.invoke(app, ["run", str(proj / "pipeline.yaml"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert runner.invoke(app, ["init", str(proj)]).exit_code == 2  # no silent overwrite
    for recipe in ("cot-local", "instruct"):
        written = init_project(tmp_path / recipe, recipe)
        from distill.config import load_config

        load_config(written[0])  # valid, and every file it names exists
    with pytest.raises(ConfigError, match="unknown recipe"):
        init_project(tmp_path / "x", "nope")


def test_python_api_mirrors_the_cli(tmp_path: Path, tiny_teacher: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's notebook example: from_yaml + overrides, run two stages, read the rows."""
    monkeypatch.chdir(tmp_path)
    pipeline = _minimal_pipeline(tmp_path, tiny_teacher)
    p = Pipeline.from_yaml(pipeline, overrides=["generate.samples_per_prompt=2"])
    manifest = p.run(stages=["generate", "filter"])
    assert manifest["stages"]["generate"]["rows"] == 2 * len(MICRO_SEEDS)
    ds = p.dataset("filter")
    assert len(ds) == 2 * len(MICRO_SEEDS) and "drop_reason" in ds.column_names
    assert sum(r["keep"] for r in p.rows("filter")) == manifest["stages"]["filter"]["kept"]
    assert len(p.dataset("sft")) == manifest["stages"]["filter"]["sft_rows"]

    # The same pipeline built in Python, no YAML: finished stages are skipped.
    cfg = PipelineConfig(name="mine", root=str(tmp_path),
                         seeds=SeedsConfig(path="questions.jsonl"),
                         teacher=TeacherConfig(backend="transformers", model=str(tiny_teacher),
                                               batch_size=8),
                         generate={"max_tokens": 48, "temperature": 0.5,
                                   "samples_per_prompt": 2},
                         filter={"verify": True, "dedup": {"exact": True, "near": True}},
                         stages=["generate", "filter"])
    again = Pipeline(cfg).run()
    assert again["stages"]["generate"]["started"] == manifest["stages"]["generate"]["started"]
    with pytest.raises(ConfigError, match="train: section missing"):
        Pipeline(cfg).run(stages=["train"])
