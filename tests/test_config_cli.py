"""Config validation and the CLI's exit-code contract: bad input is exit 2 with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.config import ConfigError, apply_overrides, load_config
from distill.records import atomic_path, write_json

runner = CliRunner()


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def _invoke(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.output


def test_valid_config_loads_with_overrides(micro_pipeline: Path) -> None:
    cfg = load_config(micro_pipeline, ["generate.temperature=0.1", "train.lora.r=4"])
    assert cfg.generate.temperature == 0.1
    assert cfg.train.lora is not None and cfg.train.lora.r == 4
    assert cfg.resolve("data/seeds.jsonl").exists()


def test_unknown_key_is_exit_2_naming_the_field(micro_pipeline: Path) -> None:
    _edit(micro_pipeline, "  samples_per_prompt: 2", "  samples_per_promt: 2")
    code, out = _invoke("run", str(micro_pipeline), "--dry-run")
    assert code == 2
    assert "generate.samples_per_promt" in out and "unknown key" in out
    assert str(micro_pipeline) in out.replace("\n", "")


def test_wrong_type_is_exit_2(micro_pipeline: Path) -> None:
    code, out = _invoke("run", str(micro_pipeline), "--set", "generate.temperature=hot")
    assert code == 2 and "generate.temperature" in out


def test_missing_file_is_exit_2(micro_pipeline: Path) -> None:
    code, out = _invoke("run", str(micro_pipeline), "--set", "seeds.path=data/nope.jsonl")
    assert code == 2 and "seeds.path" in out and "not found" in out


def test_undefined_template_variable_is_exit_2(micro_pipeline: Path) -> None:
    prompt = micro_pipeline.parent.parent / "prompts" / "cot.j2"
    prompt.write_text("{{ question }} and {{ context }}")
    code, out = _invoke("run", str(micro_pipeline), "--dry-run")
    assert code == 2 and "cot.j2" in out and "context" in out


def test_bad_seed_row_is_exit_2(micro_pipeline: Path) -> None:
    seeds = micro_pipeline.parent.parent / "data" / "seeds.jsonl"
    seeds.write_text(seeds.read_text() + "{not json\n")
    code, out = _invoke("run", str(micro_pipeline), "--dry-run")
    assert code == 2 and "seeds.jsonl:7" in out.replace("\n", "")


def test_dry_run_renders_a_prompt_and_counts_requests(micro_pipeline: Path, tmp_path: Path
                                                      ) -> None:
    code, out = _invoke("run", str(micro_pipeline), "--dry-run", "--run-dir",
                        str(tmp_path / "r"))
    assert code == 0, out
    assert "Tom has 3 apples" in out and "step by step" in out
    assert "12" in out  # 6 seeds x 2 samples
    assert not (tmp_path / "r").exists()  # nothing run, nothing written


def test_overrides_parse_yaml_scalars() -> None:
    data = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=true", "d.e=[1, 2]", "f=x"])
    assert data == {"a": {"b": 2, "c": True}, "d": {"e": [1, 2]}, "f": "x"}
    with pytest.raises(ConfigError):
        apply_overrides({}, ["novalue"])


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json(target, {"good": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("{partial")
        raise RuntimeError("crash mid-write")
    assert target.read_text().strip().startswith("{") and '"good": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_report_on_a_non_run_dir_is_exit_2(tmp_path: Path) -> None:
    code, out = _invoke("report", str(tmp_path))
    assert code == 2 and "manifest.json" in out


def test_summary_shows_train_and_export_results() -> None:
    from distill.cli import stage_results

    train = {"status": "done", "method": "kd", "students": {
        "student": {"steps": 120, "final_loss": 0.51234, "train_s": 42.4, "dir": "student"},
        "label_only": {"steps": 120, "final_loss": 1.2, "train_s": 9.9}}}
    line = stage_results("train", train)
    assert line.startswith("method=kd")
    assert "student: 120 steps, loss 0.5123, 42 s" in line
    assert "label_only: 120 steps, loss 1.2, 10 s" in line
    export = {"status": "done", "formats": "merged,int8,gguf", "smallest_format": "gguf",
              "smallest_bytes": 145_000_000, "smallest_ratio_vs_teacher": 3.71,
              "merged_accuracy": 0.42, "int8_accuracy": 0.0}
    line = stage_results("export", export)
    assert "formats=merged,int8,gguf" in line and "smallest_mb=145.0" in line
    assert "int8_accuracy=0.0" in line and "merged_accuracy=0.42" in line
