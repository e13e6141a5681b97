"""Bad input loses nothing and costs nothing: exit 2, one line naming the field, no request
sent, and an existing run directory left byte-for-byte unchanged (issue #16)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.config import FilterConfig, load_config
from distill.pipeline import input_fingerprint
from distill.records import RunDir
from tests import fakeserver_fixture
from tests.fakeserver import FakeServer

fake_server = fakeserver_fixture.fake_server


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env=(os.environ | (env or {})))


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


_GENERATED: dict[str, Path] = {}


@pytest.fixture()
def generated(micro_pipeline: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, Path, dict[str, str]]:
    """The micro project with a finished generate stage (run once, then copied: every micro
    project has the same seeds and teacher), and a snapshot of its run dir."""
    run = micro_pipeline.parent.parent / "run"
    if "run" not in _GENERATED:
        res = _cli("generate", str(micro_pipeline), "--run-dir", str(run),
                   cwd=micro_pipeline.parent)
        assert res.returncode == 0, res.stderr[-2000:]
        _GENERATED["run"] = tmp_path_factory.mktemp("generated") / "run"
        shutil.copytree(run, _GENERATED["run"])
    else:
        shutil.copytree(_GENERATED["run"], run)
    assert (run / "generate" / "generations.jsonl").stat().st_size > 0
    return micro_pipeline, run, _snapshot(run)


def _assert_exit_2(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout[-1500:], res.stderr[-1500:])
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 2, res.stderr
    for n in needles:
        assert n in res.stderr, (n, res.stderr)


def test_empty_seed_file_is_exit_2_and_keeps_the_run(generated: tuple[Path, Path, dict[str, str]]
                                                     ) -> None:
    pipeline, run, before = generated
    (pipeline.parent.parent / "data" / "seeds.jsonl").write_text("\n")
    res = _cli("run", str(pipeline), "--run-dir", str(run), cwd=pipeline.parent)
    _assert_exit_2(res, "seeds.path", "no rows")
    assert _snapshot(run) == before


def test_unset_api_key_variable_sends_nothing(generated: tuple[Path, Path, dict[str, str]],
                                              fake_server: FakeServer) -> None:
    pipeline, run, before = generated
    env = {k: v for k, v in os.environ.items() if k != "DISTILL_UNSET_KEY"}
    res = subprocess.run(
        [sys.executable, "-m", "distill.cli", "generate", str(pipeline), "--run-dir", str(run),
         "--set", "teacher.backend=openai", "--set", f"teacher.base_url={fake_server.url}",
         "--set", "teacher.model=served", "--set", "teacher.api_key_env=DISTILL_UNSET_KEY"],
        cwd=pipeline.parent, capture_output=True, text=True, timeout=120, env=env)
    _assert_exit_2(res, "teacher.api_key_env", "DISTILL_UNSET_KEY")
    assert fake_server.chat_count == 0
    assert _snapshot(run) == before


def test_run_without_a_train_section_is_exit_2(generated: tuple[Path, Path, dict[str, str]]
                                                ) -> None:
    pipeline, run, before = generated
    text = pipeline.read_text()
    start, end = text.index("train:"), text.index("evaluate:")
    pipeline.write_text(text[:start] + text[end:])
    res = _cli("run", str(pipeline), "--run-dir", str(run), cwd=pipeline.parent)
    _assert_exit_2(res, "train: section missing")
    assert _snapshot(run) == before


@pytest.mark.parametrize("offline", ["1", ""])
def test_unreachable_student_fails_at_once(generated: tuple[Path, Path, dict[str, str]],
                                           offline: str) -> None:
    pipeline, run, before = generated
    t0 = time.perf_counter()
    res = _cli("run", str(pipeline), "--run-dir", str(run), "--set", "train.student_config=null",
               "--set", "train.student=no-such-org/no-such-model", cwd=pipeline.parent,
               env={"HF_HUB_OFFLINE": offline})
    _assert_exit_2(res, "train.student", "no-such-org/no-such-model")
    assert time.perf_counter() - t0 < 60  # no retry storm
    assert _snapshot(run) == before


def test_missing_local_student_dir_names_the_field(generated: tuple[Path, Path, dict[str, str]]
                                                   ) -> None:
    pipeline, run, before = generated
    res = _cli("train", str(pipeline), "--run-dir", str(run), "--set",
               "train.student=./models/typo", "--set", "train.student_config=null",
               cwd=pipeline.parent)
    _assert_exit_2(res, "train.student", "not a model directory")
    assert _snapshot(run) == before


@pytest.mark.parametrize("field", ["evaluate.dataset", "train.dev.dataset"])
def test_dataset_typo_is_found_before_generate(micro_pipeline: Path, field: str) -> None:
    run = micro_pipeline.parent.parent / "run"
    extra = ["--set", "train.dev.dataset=data/typo.jsonl"] if field == "train.dev.dataset" \
        else ["--set", "evaluate.dataset=data/typo.jsonl"]
    res = _cli("run", str(micro_pipeline), "--run-dir", str(run), *extra, cwd=micro_pipeline.parent)
    _assert_exit_2(res, field, "data/typo.jsonl")
    assert not run.exists()


def test_editing_an_eval_or_dev_file_reruns_the_stage(micro_pipeline: Path) -> None:
    root = micro_pipeline.parent.parent
    (root / "data" / "dev.jsonl").write_text('{"question": "1 + 1?", "answer": "2"}\n')
    cfg = load_config(micro_pipeline, ["train.dev.dataset=data/dev.jsonl"])
    run = RunDir(root / "run")
    before = {s: input_fingerprint(s, cfg, run) for s in ("train", "evaluate")}
    with open(root / "data" / "seeds.jsonl", "a") as fh:  # the evaluate set of the micro project
        fh.write('{"id": "extra", "question": "2 + 2?", "answer": "4"}\n')
    (root / "data" / "dev.jsonl").write_text('{"question": "1 + 2?", "answer": "3"}\n')
    after = {s: input_fingerprint(s, cfg, run) for s in ("train", "evaluate")}
    assert before["train"] != after["train"]
    assert before["evaluate"] != after["evaluate"]


def test_failed_stage_keeps_the_previous_output(generated: tuple[Path, Path, dict[str, str]]
                                                ) -> None:
    """A generate stage that ends with no rows raises; the old generations stay."""
    from distill.config import ConfigError
    from distill.io import write_stage

    _, run, before = generated
    with pytest.raises(ConfigError, match="no rows"):
        write_stage(run / "generate", [], "generations.jsonl")
    assert _snapshot(run) == before


def test_filter_switches_accept_true_and_false() -> None:
    f = FilterConfig.model_validate({"verify": True, "heuristics": True,
                                     "dedup": {"near": True}, "judge": False})
    assert f.verify is not None and f.verify.faithfulness  # the defaults
    assert f.heuristics is not None and f.dedup is not None and f.dedup.near is not None
    assert f.judge is None
    assert FilterConfig.model_validate({"verify": False, "dedup": False}).dedup is None
