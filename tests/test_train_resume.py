"""Training checkpoints and resume (`distill.train.checkpoints`): a `distill train` killed with
SIGKILL mid-run and rerun ends with the same loss curve and weights as one that ran through, for
sft, kd (stored top-k), cross-tokenizer kd and gkd; an incomplete checkpoint is skipped; a student
finished before the kill is not retrained; checkpoints of another job are not resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.conftest import COT_TEMPLATE, MICRO_SEEDS  # noqa: E402
from tests.test_interrupts import default_sigint  # noqa: E402

pytestmark = [pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX"),
              pytest.mark.slow]

# `distill ...` with a callback that SIGKILLs the process at the end of optimizer step STEP of
# the student labelled LABEL (after any checkpoint of an earlier step is on disk); -STEP: sends
# it SIGINT (Ctrl-C) there instead.
KILLING_CLI = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    import distill.train.progress as progress

    label, step = sys.argv[1], int(sys.argv[2])
    sig = signal.SIGINT if step < 0 else signal.SIGKILL  # a negative step: Ctrl-C there
    step = abs(step)

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                os.kill(os.getpid(), sig)

    plain = progress.training_callbacks
    progress.training_callbacks = lambda name: plain(name) + ([KillAt()] if name == label else [])
    from distill.cli import main
    sys.argv = ["distill", *sys.argv[3:]]
    main()
""")
DISTILL = [sys.executable, "-c", "from distill.cli import main; main()"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> tuple[Path, Path]:
    """A pipeline file and a run directory with generate (top-5 soft targets) and filter done."""
    from distill.config import load_config
    from distill.pipeline import run_stage
    from distill.records import RunDir

    root = tmp_path_factory.mktemp("resume-project")
    for d in ("pipelines", "prompts", "data"):
        (root / d).mkdir()
    (root / "prompts" / "cot.j2").write_text(COT_TEMPLATE.read_text())
    (root / "data" / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in MICRO_SEEDS))
    pipeline = root / "pipelines" / "resume.yaml"
    pipeline.write_text(textwrap.dedent(f"""
        name: resume
        seed: 0
        stages: [generate, filter, train]
        seeds: {{path: data/seeds.jsonl}}
        teacher: {{backend: transformers, model: {tiny_teacher}, top_logprobs: 5,
                  batch_size: 16}}
        generate: {{prompt: prompts/cot.j2, samples_per_prompt: 3, temperature: 0.7,
                   max_tokens: 48}}
        filter: {{verify: {{}}, dedup: null}}
        train:
          student_config: {{model_type: llama, hidden_size: 32, intermediate_size: 64,
                            num_hidden_layers: 1, num_attention_heads: 4,
                            num_key_value_heads: 4, max_position_embeddings: 512,
                            tie_word_embeddings: true}}
          tokenizer: {tiny_teacher}
          max_steps: 8
          batch_size: 2
          learning_rate: 0.003
          max_length: 256
          logging_steps: 1
          save_steps: 2
          lora: {{r: 4, alpha: 8, dropout: 0.1}}
          kd: {{temperature: 2.0, alpha: 0.5, max_new_tokens: 12, lmbda: 0.5}}
    """))
    cfg = load_config(pipeline)
    run = RunDir(root / "run")
    for stage in ("generate", "filter"):
        run_stage(stage, cfg, run)
    return pipeline, run.root


def _train(pipeline: Path, run: Path, overrides: list[str], kill: tuple[str, int] | None = None
           ) -> subprocess.CompletedProcess[str]:
    sets = [x for o in overrides for x in ("--set", o)]
    args = ["train", str(pipeline), "--run-dir", str(run), *sets]
    cmd = ([sys.executable, "-c", KILLING_CLI, kill[0], str(kill[1]), *args] if kill
           else [*DISTILL, *args])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"DISTILL_PROGRESS_EVERY": "0"},
                          preexec_fn=default_sigint)


def _students(run: Path) -> dict[str, Any]:
    students: dict[str, Any] = json.loads((run / "manifest.json").read_text())["stages"][
        "train"]["students"]
    return students


def _weights(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _same_weights(a: Path, b: Path) -> None:
    import torch

    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


def _same_curve(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert [s for s, _ in a["loss_history"]] == [s for s, _ in b["loss_history"]]
    for (_, la), (_, lb) in zip(a["loss_history"], b["loss_history"], strict=True):
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)


METHODS = {
    "sft": (["train.method=sft"], "student"),
    "kd": (["train.method=kd"], "kd"),
    "kd-xtok": (["train.method=kd", "train.kd.cross_tokenizer=align"], "kd"),
    "gkd": (["train.method=gkd"], "gkd"),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_sigkill_mid_train_then_rerun_resumes_to_the_same_student(
        project: tuple[Path, Path], tmp_path: Path, method: str) -> None:
    pipeline, base = project
    overrides, label = METHODS[method]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    shutil.copytree(base, straight)
    shutil.copytree(base, killed)

    res = _train(pipeline, straight, overrides)
    assert res.returncode == 0, res.stderr[-3000:]

    res = _train(pipeline, killed, overrides, kill=(label, 5))
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    ckpts = killed / "checkpoints" / "student"
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (killed / "student").exists()  # nothing half-written in the student's place

    res = _train(pipeline, killed, overrides)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr and "checkpoint-4" in res.stderr
    a, b = _students(straight)["student"], _students(killed)["student"]
    assert b["resumed_from_step"] == 4 and a["resumed_from_step"] is None
    assert a["steps"] == b["steps"] == 8
    _same_curve(a, b)
    _same_weights(straight / "student", killed / "student")
    assert not (killed / "checkpoints").exists()  # the stage finished: checkpoints removed


def test_incomplete_checkpoint_is_skipped_and_a_finished_student_not_retrained(
        project: tuple[Path, Path], tmp_path: Path) -> None:
    """sft + train.also [kd]: killed while the kd student trains (the sft student saved); the
    last kd checkpoint cut short (no distill_state.json, as when killed while saving)."""
    pipeline, base = project
    overrides = ["train.method=sft", "train.also=[kd]"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    shutil.copytree(base, straight)
    shutil.copytree(base, killed)
    assert _train(pipeline, straight, overrides).returncode == 0

    res = _train(pipeline, killed, overrides, kill=("kd", 7))
    assert res.returncode == -signal.SIGKILL
    first = (killed / "student" / "model.safetensors").stat().st_mtime_ns
    assert (killed / "checkpoints" / "student" / "finished.json").is_file()
    (killed / "checkpoints" / "student_kd" / "checkpoint-6" / "distill_state.json").unlink()

    res = _train(pipeline, killed, overrides)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already trained by an interrupted run" in res.stderr
    assert (killed / "student" / "model.safetensors").stat().st_mtime_ns == first
    assert "checkpoint-4" in res.stderr  # checkpoint-6 was incomplete
    for name, d in (("student", "student"), ("kd", "student_kd")):
        _same_curve(_students(straight)[name], _students(killed)[name])
        _same_weights(straight / d, killed / d)
    assert _students(killed)["kd"]["resumed_from_step"] == 4


def test_checkpoints_of_another_job_are_not_resumed(project: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    pipeline, base = project
    run = tmp_path / "run"
    shutil.copytree(base, run)
    res = _train(pipeline, run, ["train.method=sft"], kill=("student", 5))
    assert res.returncode == -signal.SIGKILL
    res = _train(pipeline, run, ["train.method=sft", "train.learning_rate=0.001"])
    assert res.returncode == 0, res.stderr[-3000:]
    err = " ".join(res.stderr.split())
    assert "of another training job" in err and "resuming from" not in err
    assert _students(run)["student"]["resumed_from_step"] is None


def test_ctrl_c_mid_train_checkpoints_that_step_exits_1_and_the_rerun_resumes(
        project: tuple[Path, Path], tmp_path: Path) -> None:
    pipeline, base = project
    overrides = ["train.method=sft"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    shutil.copytree(base, straight)
    shutil.copytree(base, stopped)
    assert _train(pipeline, straight, overrides).returncode == 0

    res = _train(pipeline, stopped, overrides, kill=("student", -3))
    assert res.returncode == 1, res.stderr[-3000:]
    err = res.stderr
    assert "Traceback" not in err
    assert "stopping after this step with a checkpoint" in err
    assert err.strip().splitlines()[-1].startswith("error: interrupted; rerun the same command")
    ckpt = stopped / "checkpoints" / "student" / "checkpoint-3"  # not a multiple of save_steps
    assert (ckpt / "distill_state.json").is_file() and (ckpt / "trainer_state.json").is_file()
    assert not (stopped / "student").exists()
    manifest = json.loads((stopped / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "failed"

    res = _train(pipeline, stopped, overrides)
    assert res.returncode == 0, res.stderr[-3000:]
    b = _students(stopped)["student"]
    assert b["resumed_from_step"] == 3
    _same_curve(_students(straight)["student"], b)
    _same_weights(straight / "student", stopped / "student")
