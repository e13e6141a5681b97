"""The whole pipeline on a micro config: generate → filter → train → evaluate → report."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from distill.cli import app

runner = CliRunner()


def test_micro_pipeline_end_to_end(micro_pipeline: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    res = runner.invoke(app, ["run", str(micro_pipeline), "--run-dir", str(run_dir)])
    assert res.exit_code == 0, res.output
    for f in ("config.yaml", "manifest.json", "cache.sqlite", "generate/generations.jsonl",
              "filter/filtered.jsonl", "filter/funnel.json", "sft/sft.jsonl", "sft/README.md",
              "student/model.safetensors", "student/README.md", "evaluate/metrics.json",
              "evaluate/predictions.jsonl", "report.md", "accuracy.png", "funnel.png"):
        assert (run_dir / f).exists(), f
    gens_text = (run_dir / "generate/generations.jsonl").read_text()
    gens = [json.loads(x) for x in gens_text.splitlines()]
    assert len(gens) == 12 and {g["sample"] for g in gens} == {0, 1}
    # The memorizing teacher answers its questions: most samples verify.
    filtered_text = (run_dir / "filter/filtered.jsonl").read_text()
    filtered = [json.loads(x) for x in filtered_text.splitlines()]
    assert all("keep" in r and "drop_reason" in r for r in filtered)
    assert all(r["drop_reason"] for r in filtered if not r["keep"])
    assert sum(r["keep"] for r in filtered) >= 3
    metrics = json.loads((run_dir / "evaluate/metrics.json").read_text())
    for key in ("teacher_accuracy", "student_accuracy", "base_student_accuracy",
                "label_only_accuracy", "teacher_params", "student_params", "n_eval"):
        assert key in metrics, key
    assert metrics["n_eval"] == 6
    assert metrics["teacher_accuracy"] >= 0.8
    assert metrics["student_params"] < metrics["teacher_params"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())

    # A rerun skips every finished stage and sends nothing to the teacher.
    res = runner.invoke(app, ["run", str(micro_pipeline), "--run-dir", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["train"][
        "finished"] == manifest["stages"]["train"]["finished"]

    # Evaluate again: the teacher's answers now all come from the cache and the model is never
    # loaded; its parameter count must still be reported (read from the safetensors headers).
    res = runner.invoke(app, ["evaluate", str(micro_pipeline), "--run-dir", str(run_dir)])
    assert res.exit_code == 0, res.output
    again = json.loads((run_dir / "evaluate/metrics.json").read_text())
    assert again["teacher_params"] == metrics["teacher_params"]
    assert again["compression_ratio"] == metrics["compression_ratio"]
