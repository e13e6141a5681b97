"""The evaluate stage on the micro project (issue #20): sampled pass@k / maj@k beside greedy
accuracy, paired comparisons, per-template / per-difficulty tables, lm-evaluation-harness on the
tiny in-process models with local task files, and the errors for bad evaluate settings."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.records import RunDir
from tests.conftest import MICRO_SEEDS, ROOT
from tests.tiny import make_tiny_lm

runner = CliRunner()


def eval_rows() -> list[dict[str, Any]]:
    """The micro questions with GSM8K-style gold solutions (1 or 2 calculator notes) and a
    template name, so both breakdowns have something to group."""
    rows = []
    for i, s in enumerate(MICRO_SEEDS):
        a, b = (int(w) for w in s["question"].split() if w.isdigit())
        note = f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}"
        sol = note if i % 2 == 0 else f"He had {a}: <<{a}*1={a}>>{a}\n{note}"
        rows.append(s | {"answer": f"{sol}\n#### {a + b}",
                         "template": "small" if a + b < 8 else "big"})
    return rows


@pytest.fixture()
def project(micro_pipeline: Path, tiny_teacher: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(pipeline file, run dir) with two 'trained' students already in the run dir: the
    memorizing teacher's weights as `student`, an untrained tiny model as `label_only`."""
    root = micro_pipeline.parents[1]
    with open(root / "data" / "eval.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in eval_rows())
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_teacher, run_dir / "student")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    make_tiny_lm(run_dir / "student_label_only", tok, hidden=32, layers=1, seed=3)
    RunDir(run_dir).update_manifest("train", status="done", students={
        "student": {"dir": "student"}, "label_only": {"dir": "student_label_only"}})
    return micro_pipeline, run_dir


def evaluate(pipeline: Path, run_dir: Path, *sets: str) -> Any:
    args = ["evaluate", str(pipeline), "--run-dir", str(run_dir),
            "--set", "evaluate.dataset=data/eval.jsonl"]
    for s in sets:
        args += ["--set", s]
    return runner.invoke(app, args)


def read_preds(run_dir: Path) -> list[dict[str, Any]]:
    text = (run_dir / "evaluate" / "predictions.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def hand_mcnemar(b: int, c: int) -> float:
    n = b + c
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1))
                                  / 2**n)


def test_sampled_paired_and_breakdown_metrics(project: tuple[Path, Path]) -> None:
    pipeline, run_dir = project
    res = evaluate(pipeline, run_dir, "evaluate.samples=4", "evaluate.temperature=1.0")
    assert res.exit_code == 0, res.output
    m = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    preds = read_preds(run_dir)
    names = {"teacher", "base_student", "student", "label_only"}
    assert set(m["pass_at_k"]) == set(m["maj_at_k"]) == names
    assert m["harness"] == {}
    for name in names:
        mine = [p for p in preds if p["model"] == name]
        greedy = [p for p in mine if p["mode"] == "greedy"]
        sampled = [p for p in mine if p["mode"] == "sampled"]
        assert len(greedy) == 6 and {p["sample"] for p in greedy} == {0}
        assert len(sampled) == 24 and {p["sample"] for p in sampled} == {0, 1, 2, 3}
        assert m["models"][name]["accuracy"] == round(sum(p["correct"] for p in greedy) / 6, 4)
        by_item: dict[str, list[bool]] = {}
        for p in sorted(sampled, key=lambda p: p["sample"]):
            by_item.setdefault(p["id"], []).append(p["correct"])
        for k in (1, 4):  # pass@k by its definition: share of k-subsets holding a correct one
            want = sum(sum(any(s) for s in itertools.combinations(c, k))
                       / math.comb(4, k) for c in by_item.values()) / 6
            assert m["pass_at_k"][name][str(k)] == pytest.approx(want, abs=1e-4)
        maj1 = sum(c[0] for c in by_item.values()) / 6  # maj@1: sample 0 alone
        assert m["maj_at_k"][name]["1"] == pytest.approx(maj1, abs=1e-4)
    assert m["teacher_accuracy"] >= 0.8  # the teacher memorized these questions
    assert m["pass_at_k"]["teacher"]["4"] >= m["pass_at_k"]["teacher"]["1"]

    greedy_ok = {(p["model"], p["id"]): p["correct"] for p in preds if p["mode"] == "greedy"}
    assert set(m["paired"]) == {"student-vs-label_only", "student-vs-base_student",
                                "student-vs-teacher"}
    for key, r in m["paired"].items():
        a, b = key.split("-vs-")
        only_a = sum(greedy_ok[(a, i)] and not greedy_ok[(b, i)] for i in by_item)
        only_b = sum(greedy_ok[(b, i)] and not greedy_ok[(a, i)] for i in by_item)
        assert (r["a_only"], r["b_only"]) == (only_a, only_b)
        assert r["p"] == pytest.approx(hand_mcnemar(only_a, only_b), abs=1e-6)
        assert r["diff"] == pytest.approx(m["models"][a]["accuracy"] - m["models"][b]["accuracy"],
                                          abs=1e-4)
        assert r["ci"][0] <= r["diff"] <= r["ci"][1]
    # The student is the teacher's weights: same greedy answers, the whole gap closed.
    assert m["paired"]["student-vs-teacher"]["diff"] == 0.0
    assert m["gap_closed"] == 1.0 and m["gap_closed_ci"] == [1.0, 1.0]

    teacher_steps = m["breakdown"]["teacher"]["steps"]
    assert {k: v["n"] for k, v in teacher_steps.items()} == {"1": 3, "2": 3}
    assert {k: v["n"] for k, v in m["breakdown"]["teacher"]["template"].items()} == {
        "big": 3, "small": 3}
    assert {p["template"] for p in preds} == {"small", "big"}

    report = (run_dir / "report.md").read_text()
    for heading in ("### Sampled answers", "### Paired comparisons", "### By template",
                    "### By difficulty", "| student-vs-label_only |", "| pass@4 |"):
        assert heading in report, heading
    assert "lm-evaluation-harness" not in report


def test_greedy_accuracy_does_not_depend_on_samples(project: tuple[Path, Path], tmp_path: Path
                                                    ) -> None:
    """`accuracy` is the greedy answer with or without sampling beside it."""
    pipeline, run_dir = project
    other = tmp_path / "run-greedy"
    shutil.copytree(run_dir, other)
    assert evaluate(pipeline, run_dir, "evaluate.samples=3",
                    "evaluate.temperature=1.5").exit_code == 0
    res = evaluate(pipeline, other)
    assert res.exit_code == 0, res.output
    sampled_run = {(p["model"], p["id"]): p["response"] for p in read_preds(run_dir)
                   if p["mode"] == "greedy"}
    greedy_run = {(p["model"], p["id"]): p["response"] for p in read_preds(other)}
    assert sampled_run == greedy_run
    m = json.loads((other / "evaluate" / "metrics.json").read_text())
    assert m["pass_at_k"] == {} and m["maj_at_k"] == {}
    assert "### Sampled answers" not in (other / "report.md").read_text()


MICRO_TASK = """task: micro_local
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
output_type: generate_until
test_split: test
doc_to_text: "{{{{question}}}}\\nLet's think step by step."
doc_to_target: "{{{{answer}}}}"
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
generation_kwargs: {{until: ["</s>"], do_sample: false}}
filter_list:
  - name: answer
    filter: [{{function: regex, regex_pattern: "The answer is (\\\\d+)"}}, {{function: take_first}}]
metadata: {{version: 1.0}}
"""


def test_harness_on_tiny_models_offline(project: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    pipeline, run_dir = project
    root = pipeline.parents[1]
    (root / "data" / "gsm8k").mkdir()
    for split in ("train", "test"):
        lines = (ROOT / "data" / "gsm8k" / f"{split}.jsonl").read_text().splitlines()[:3]
        (root / "data" / "gsm8k" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (root / "tasks").mkdir()
    (root / "tasks" / "micro_local.yaml").write_text(
        MICRO_TASK.format(data=root / "data" / "seeds.jsonl"))
    pipeline.write_text(pipeline.read_text() + """  harness:
    tasks: [gsm8k_local, micro_local]
    limit: 3
    num_fewshot: 0
    apply_chat_template: true
    include_path: tasks
""")
    res = evaluate(pipeline, run_dir)
    assert res.exit_code == 0, res.output
    m = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    h = m["harness"]
    assert set(h) == {"teacher", "base_student", "student", "label_only"}
    for scores in h.values():
        assert set(scores) == {"gsm8k_local", "micro_local"}
        for metric in ("exact_match,strict-match", "exact_match,flexible-extract"):
            assert 0.0 <= scores["gsm8k_local"][metric] <= 1.0
    # The memorizing teacher (and its copy) answers its own questions through the harness too;
    # the untrained model does not.
    assert h["teacher"]["micro_local"]["exact_match,answer"] >= 2 / 3
    assert h["student"]["micro_local"] == h["teacher"]["micro_local"]
    assert h["label_only"]["micro_local"]["exact_match,answer"] == 0.0
    info = m["harness_info"]
    assert info["tasks"]["gsm8k_local"] == {"n": 3, "num_fewshot": 0}
    resolved = (run_dir / "evaluate" / "harness_tasks" / "gsm8k_local.yaml").read_text()
    assert str((root / "data" / "gsm8k" / "test.jsonl").resolve()) in resolved
    assert (run_dir / "evaluate" / "harness" / "student.json").exists()
    report = (run_dir / "report.md").read_text()
    assert "### lm-evaluation-harness" in report
    assert "micro_local exact_match,answer" in report


@pytest.mark.parametrize(("sets", "message"), [
    (["evaluate.samples=4", "generate.temperature=0"], "evaluate.samples: 4 samples at"),
    (["evaluate.harness.tasks=[no_such_task_xyz]"], "unknown task(s) no_such_task_xyz"),
    (["evaluate.harness.tasks=[gsm8k_local]"], "split file not found: data/gsm8k/"),
])
def test_bad_evaluate_settings_fail_before_scoring(project: tuple[Path, Path], sets: list[str],
                                                   message: str) -> None:
    if "harness" in sets[0] and importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval not installed")
    pipeline, run_dir = project
    res = evaluate(pipeline, run_dir, *sets)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not (run_dir / "evaluate" / "predictions.jsonl").exists()


def test_harness_without_lm_eval_is_a_config_error(project: tuple[Path, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    pipeline, run_dir = project
    res = evaluate(pipeline, run_dir, "evaluate.harness.limit=2")
    assert res.exit_code == 2, res.output
    assert "not installed; pip install lm-eval" in res.output
    assert not (run_dir / "evaluate" / "predictions.jsonl").exists()
