"""A killed evaluate resumes (issue #27): the base and trained students' answers are cached per
forward batch in `evaluate/answers.sqlite`, so the rerun generates only what is missing and
writes the predictions and metrics of an uninterrupted run; a student retrained in the same
directory is answered again."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from distill.teachers.transformers_backend import TransformersTeacher
from tests.test_evaluate_stage import evaluate, project, read_preds
from tests.tiny import make_tiny_lm

__all__ = ["project"]

SETS = ("evaluate.batch_size=2", "evaluate.samples=2", "evaluate.temperature=1.0")
"""6 items, greedy + 2 samples each: 18 answers a model, in 3 + 6 batches of 2."""
TIMINGS = ("latency_per_answer_s", "tokens_per_s", "items_per_s")


class Generations:
    """Counts the answers each local model generates (by its model name); with `stop_after`
    set, raises KeyboardInterrupt (a Ctrl-C) as `stop_model` starts that many + 1st batch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.answers: Counter[str] = Counter()
        self.batches: Counter[str] = Counter()
        self.stop_model: str | None = None
        self.stop_after = 0
        real: Callable[..., Any] = TransformersTeacher._generate

        def counted(teacher: TransformersTeacher, batch: Any, params: Any) -> Any:
            name = Path(teacher.model_name).name
            if name == self.stop_model and self.batches[name] == self.stop_after:
                raise KeyboardInterrupt
            out = real(teacher, batch, params)
            self.batches[name] += 1
            self.answers[name] += len(batch)
            return out

        monkeypatch.setattr(TransformersTeacher, "_generate", counted)

    def reset(self) -> None:
        self.answers.clear()
        self.batches.clear()
        self.stop_model = None


def untimed_preds(run_dir: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in p.items() if k != "latency_s"} for p in read_preds(run_dir)]


def untimed_metrics(run_dir: Path) -> dict[str, Any]:
    m = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    for row in m["models"].values():
        for k in TIMINGS:
            row.pop(k)
    return m


def test_killed_evaluate_resumes_without_regenerating(
        project: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline, run_dir = project
    whole = tmp_path / "run-whole"
    shutil.copytree(run_dir, whole)
    gen = Generations(monkeypatch)
    res = evaluate(pipeline, whole, *SETS)
    assert res.exit_code == 0, res.output
    # student is a copy of the teacher: "tiny-teacher..." and "student" are two models.
    assert gen.answers["base"] == gen.answers["student"] == gen.answers["student_label_only"] == 18

    # Killed in the last model, after 4 of its 9 batches (the 3 greedy, 1 sampled).
    gen.reset()
    gen.stop_model, gen.stop_after = "student_label_only", 4
    res = evaluate(pipeline, run_dir, *SETS)
    assert res.exit_code != 0 and isinstance(res.exception, KeyboardInterrupt | SystemExit)
    assert gen.answers["student_label_only"] == 8
    assert not (run_dir / "evaluate" / "predictions.jsonl").exists()

    gen.reset()
    res = evaluate(pipeline, run_dir, *SETS)
    assert res.exit_code == 0, res.output
    # Only the 10 answers the kill lost are generated again; the other models none.
    assert dict(gen.answers) == {"student_label_only": 10}
    assert untimed_preds(run_dir) == untimed_preds(whole)
    assert untimed_metrics(run_dir) == untimed_metrics(whole)
    m = json.loads((run_dir / "evaluate" / "metrics.json").read_text())["models"]
    for name in ("teacher", "base_student", "student"):  # every answer from a cache: untimed
        assert all(m[name][k] is None for k in TIMINGS), (name, m[name])
    assert all(m["label_only"][k] is not None for k in TIMINGS)

    gen.reset()  # a forced rerun with the same models generates nothing
    res = evaluate(pipeline, run_dir, *SETS, "evaluate.bootstrap=101")
    assert res.exit_code == 0, res.output
    assert not gen.answers
    assert untimed_preds(run_dir) == untimed_preds(whole)


def test_retrained_student_is_answered_again(project: tuple[Path, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline, run_dir = project
    gen = Generations(monkeypatch)
    assert evaluate(pipeline, run_dir, "evaluate.batch_size=2").exit_code == 0
    before = {(p["model"], p["id"]): p["response"] for p in read_preds(run_dir)}
    assert gen.answers["student"] == 6

    # "Retrained": other weights of the same shape in the same directory, so the files keep
    # their names and sizes; only their contents and mtimes change.
    from transformers import AutoTokenizer

    student = run_dir / "student"
    sizes = {p.name: p.stat().st_size for p in student.iterdir()}
    tok = AutoTokenizer.from_pretrained(student)
    make_tiny_lm(None, tok, hidden=64, layers=2, seed=11).save_pretrained(student)
    assert {p.name: p.stat().st_size for p in student.iterdir()} == sizes

    gen.reset()
    res = evaluate(pipeline, run_dir, "evaluate.batch_size=2")
    assert res.exit_code == 0, res.output
    assert dict(gen.answers) == {"student": 6}  # the base student and label_only: cached
    after = {(p["model"], p["id"]): p["response"] for p in read_preds(run_dir)}
    assert all(after[k] == v for k, v in before.items() if k[0] != "student")
    # The new weights' own answers (the old student memorized them; random weights do not).
    mine = sorted(k for k in before if k[0] == "student")
    assert len(mine) == 6 and [after[k] for k in mine] != [before[k] for k in mine]
