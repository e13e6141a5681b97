"""Learning curves on a dev set (`train.dev`), and the label-only ablation's step budget."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from typer.testing import CliRunner

from distill.cli import app
from distill.config import load_config
from distill.train.devcurve import dev_accuracy, steps_to_reach
from tests.conftest import MICRO_SEEDS

runner = CliRunner()

DEV = [{"id": f"d{i}", "question": f"Tom has {a} apples and buys {b} more. How many apples now?",
        "answer": str(a + b)} for i, (a, b) in enumerate([(1, 2), (2, 2), (3, 3), (7, 1)])]


HELD_OUT = [{"id": f"h{i}", "question": f"Tom has {a} apples and buys {b} more. How many apples "
             "now?", "answer": str(a + b)} for i, (a, b) in enumerate([(5, 5), (6, 3)])]


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def _with_dev(pipeline: Path, dev_rows: list[dict], held_out: list[dict] | None = None,
              every: int = 2) -> Path:
    """The micro pipeline with a dev set; held out on `held_out` (default: new questions)."""
    data_dir = pipeline.parent.parent / "data"
    _write(data_dir / "dev.jsonl", dev_rows)
    _write(data_dir / "held_out.jsonl", held_out or HELD_OUT)
    data = yaml.safe_load(pipeline.read_text())
    data["train"]["dev"] = {"dataset": "data/dev.jsonl", "every_steps": every, "max_tokens": 48}
    data["evaluate"]["dataset"] = "data/held_out.jsonl"
    pipeline.write_text(yaml.safe_dump(data))
    return pipeline


def test_dev_accuracy_scores_a_model_like_the_evaluate_stage(micro_pipeline: Path,
                                                            tiny_teacher: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_config(_with_dev(micro_pipeline, DEV))
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    items = [{"id": s["id"], "question": s["question"], "answer": s["answer"]}
             for s in MICRO_SEEDS]
    # The tiny teacher memorized these questions; with wrong golds nothing may count.
    rng = torch.get_rng_state()
    assert dev_accuracy(model, tok, cfg, items) >= 0.8
    assert torch.equal(rng, torch.get_rng_state())  # scoring must not reseed the training RNG
    wrong = [it | {"answer": "999"} for it in items]
    assert dev_accuracy(model, tok, cfg, wrong) == 0.0
    assert tok.padding_side == AutoTokenizer.from_pretrained(tiny_teacher).padding_side


def test_train_stage_records_curves_and_matches_label_only_steps(micro_pipeline: Path,
                                                                tmp_path: Path) -> None:
    pipeline = _with_dev(micro_pipeline, DEV + [MICRO_SEEDS[0] | {"id": "dup"}])
    run_dir = tmp_path / "run"
    res = runner.invoke(app, ["run", str(pipeline), "--run-dir", str(run_dir)])
    assert res.exit_code == 0, res.output
    train = json.loads((run_dir / "manifest.json").read_text())["stages"]["train"]
    student, label_only = train["students"]["student"], train["students"]["label_only"]
    # A training question is not a dev question: only the 4 new ones are scored.
    assert student["dev_n"] == 4
    steps = [s for s, _ in student["dev_curve"]]
    assert steps[0] == 0 and steps[-1] == student["steps"]
    assert all(b > a for a, b in zip(steps, steps[1:], strict=False))
    assert all(0.0 <= acc <= 1.0 for _, acc in student["dev_curve"])
    # The ablation gets as many updates as the CoT student, though it has fewer rows.
    assert label_only["steps"] == student["steps"]
    assert train["dev_target"] == student["dev_curve"][-1][1]
    assert train["steps_to_dev_target"]["student"] <= student["steps"]
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert metrics["steps_to_dev_target"] == train["steps_to_dev_target"]
    report = (run_dir / "report.md").read_text()
    assert "Learning curves" in report and (run_dir / "learning_curves.png").exists()


def test_dev_set_overlapping_the_held_out_set_is_refused(micro_pipeline: Path,
                                                         tmp_path: Path) -> None:
    pipeline = _with_dev(micro_pipeline, DEV + [HELD_OUT[1]])
    res = runner.invoke(app, ["run", str(pipeline), "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 2
    assert "train.dev" in res.output and "evaluate set" in res.output


def test_steps_to_reach() -> None:
    curve = [(0, 0.0), (10, 0.4), (20, 0.8), (30, 0.7)]
    assert steps_to_reach(curve, 0.8) == 20
    assert steps_to_reach(curve, 0.4) == 10
    assert steps_to_reach(curve, 0.9) is None


def test_dev_problems_sharing_arithmetic_with_the_training_set_are_dropped() -> None:
    """Same template and numbers, other names and items: the test split never shares that with
    the train split, so a dev set must not either (it would measure recall)."""
    from distill.config import PipelineConfig
    from distill.tasks import make_task
    from distill.train.devcurve import load_dev_items

    cfg = PipelineConfig.model_validate({
        "name": "devshare",
        "seeds": {"task": {"name": "arithmetic", "split": "train", "n": 2000, "seed": 0}},
        "train": {"student": "s", "dev": {"task": {"name": "arithmetic", "split": "train",
                                                   "n": 400, "seed": 1}, "limit": 400}},
    })
    train = make_task("arithmetic", "train", 2000, 0)
    train_canon = {r["canonical"] for r in train}
    dev = make_task("arithmetic", "train", 400, 1)
    shared = [r for r in dev if r["canonical"] in train_canon]
    assert len(shared) > 10  # reworded repeats are common in this task
    items = load_dev_items(cfg, {r["question"] for r in train})
    assert len(items) == 400 - len(shared)
    assert not {r["canonical"] for r in items} & train_canon
    # Only problems actually trained on count: with no training rows nothing is dropped.
    assert len(load_dev_items(cfg, set())) == 400
