"""Every shipped pipeline file validates, and the demo's dry run renders and counts requests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_pipelines_validate(path: Path) -> None:
    if "gsm8k_generations.py" in path.read_text():  # its documented first step
        subprocess.run([sys.executable, str(ROOT / "scripts" / "gsm8k_generations.py")],
                       check=True, capture_output=True)
    cfg = load_config(path)
    assert cfg.name and cfg.stages


def test_demo_dry_run(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["run", str(ROOT / "pipelines" / "demo.yaml"), "--dry-run",
                                   "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "Let's think step by step." in res.output
    assert "5,000" in res.output and "20,000" in res.output  # 5,000 seeds x at most 4 samples
    cfg = load_config(ROOT / "pipelines" / "demo.yaml")
    assert Path(cfg.teacher.model, "model.safetensors").exists()
    assert Path(cfg.resolve(cfg.train.student), "model.safetensors").exists()
