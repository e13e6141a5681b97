"""`distill train` runs unchanged under `accelerate launch`: two data-parallel processes train one
student (SFT, or KD on stored soft targets), only the main process saves it, and no process
returns from training before the student is saved.

On a machine without GPUs, `accelerate launch --cpu --num_processes 2` starts a single process
(accelerate runs multi-CPU jobs through mpirun), so the test launches with `--multi_gpu`: that
goes through torchrun, and the trainer, finding no CUDA, runs both ranks on the CPU over gloo,
which is the same DDP code path a GPU run takes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.tiny import CHAT_TEMPLATE, make_tokenizer

pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accelerate() -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    return [str(exe)] if exe.exists() else [shutil.which("accelerate") or "accelerate"]


# Runs `distill train` in each process and notes, the moment each method's training function
# returns on that process, which files its student directory holds: a process must not go on (to
# the next student or stage, which read it) before the main process has saved the student.
DRIVER = """
import json, os, sys
from pathlib import Path

from distill.cli import main
from distill.train import stage


def noting_the_student(train):
    def wrapped(cfg, run_dir, rows, out_dir, **kw):
        info = train(cfg, run_dir, rows, out_dir, **kw)
        seen = sorted(p.name for p in Path(out_dir).glob("*"))
        Path(f"seen-rank{os.environ['RANK']}.json").write_text(json.dumps(seen))
        return info
    return wrapped


stage.TRAINERS.update({m: noting_the_student(f) for m, f in stage.TRAINERS.items()})
if os.environ.get("KILL_AT_STEP") and os.environ["RANK"] == "0":  # SIGKILL rank 0 mid-train
    import signal

    from transformers import TrainerCallback

    import distill.train.progress as progress

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == int(os.environ["KILL_AT_STEP"]):
                os.kill(os.getpid(), signal.SIGKILL)

    plain = progress.training_callbacks
    progress.training_callbacks = lambda label: plain(label) + [KillAt()]
try:
    main()
except SystemExit as done:
    if done.code:
        raise
"""


def _project(root: Path, method: str) -> Path:
    """A project dir with a curated sft set (8 rows) and a pipeline file with a tiny student;
    for KD the rows carry the teacher's tokens and a top-2 of soft targets per token."""
    rows: list[dict[str, Any]] = [
        {"id": f"r{i}", "seed_id": f"s{i}", "question": f"What is {i} + {i}?",
         "gold": str(2 * i), "answer": str(2 * i),
         "messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                      {"role": "assistant",
                       "content": f"{i} + {i} = {2 * i}.\nThe answer is {2 * i}."}]}
        for i in range(8)]
    tok = make_tokenizer(root / "tok", [m["content"] for r in rows for m in r["messages"]])
    if method == "kd":
        for r in rows:
            r["response"] = r["messages"][-1]["content"]
            r["token_ids"] = tok(r["response"], add_special_tokens=False)["input_ids"]
            r["top_logprobs"] = [[[t, -0.1], [(t + 1) % len(tok), -2.4]] for t in r["token_ids"]]
    (root / "run" / "sft").mkdir(parents=True)
    (root / "run" / "sft" / "sft.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    (root / "data").mkdir()
    (root / "data" / "seeds.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (root / "pipelines").mkdir()
    (root / "prompts").mkdir()
    src = Path(__file__).resolve().parents[1] / "src" / "distill" / "prompts" / "cot.j2"
    shutil.copy(src, root / "prompts" / "cot.j2")
    (root / "pipelines" / "ddp.yaml").write_text(f"""
name: ddp
seeds: {{path: data/seeds.jsonl}}
train:
  method: {method}
  student_config: {{model_type: llama, hidden_size: 32, intermediate_size: 64,
                   num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 4,
                   max_position_embeddings: 256, tie_word_embeddings: true}}
  tokenizer: tok
  lora: {{r: 4, alpha: 8}}
  epochs: 1
  batch_size: 2
  max_length: 128
  logging_steps: 1
""")
    (root / "driver.py").write_text(DRIVER)
    return root


@pytest.mark.parametrize("method", ["sft", "kd"])
def test_train_under_accelerate_launch_two_processes(tmp_path: Path, method: str) -> None:
    project = _project(tmp_path, method)
    run_dir = project / "run"
    cmd = [*_accelerate(), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "driver.py", "train", "pipelines/ddp.yaml", "--run-dir", str(run_dir)]
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                        "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True,
                          timeout=280)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    manifest = json.loads((run_dir / "manifest.json").read_text())
    info = manifest["stages"]["train"]["students"]["student"]
    assert manifest["stages"]["train"]["status"] == "done"
    assert info["world_size"] == 2
    if method == "kd":
        assert info["soft_targets"] == "stored top-k" and info["top_k"] == 2
    # 8 rows, 2 per device, 2 devices: 2 optimizer steps per process (the data was sharded)
    assert info["steps"] == 2
    # one student, saved once: no second writer's leftovers beside it
    student = run_dir / "student"
    assert (student / "model.safetensors").is_file()
    assert (student / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == [".lock"]
    assert (run_dir / ".lock").read_text() == ""  # released by rank 0, which held it
    assert log.count("Writing model shards: 100%") <= 1  # the merged model: main process only
    # every process found the saved student when its training call returned (the barrier)
    saved = sorted(p.name for p in student.iterdir())
    for rank in (0, 1):
        assert json.loads((project / f"seen-rank{rank}.json").read_text()) == saved, rank
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoTokenizer.from_pretrained(student).chat_template == CHAT_TEMPLATE
    AutoModelForCausalLM.from_pretrained(student)  # loads as a plain model


def _launch(project: Path, run_dir: Path, **env_extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [*_accelerate(), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "driver.py", "train", "pipelines/ddp.yaml", "--run-dir", str(run_dir)]
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                        "TOKENIZERS_PARALLELISM": "false"} | env_extra
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True,
                          timeout=280)


def test_sigkill_under_accelerate_then_rerun_resumes_to_the_same_student(tmp_path: Path
                                                                         ) -> None:
    """Two DDP processes, a checkpoint every 2 steps; rank 0 SIGKILLed at step 5 (the launcher
    stops rank 1); the relaunch resumes both from checkpoint-4 and ends where an uninterrupted
    run ends (loss curve and weights)."""
    import torch
    from safetensors.torch import load_file

    runs = {}
    for name in ("straight", "killed"):
        project = _project(tmp_path / name, "sft")
        yaml = project / "pipelines" / "ddp.yaml"
        yaml.write_text(yaml.read_text().replace("  epochs: 1\n",
                                                 "  epochs: 1\n  max_steps: 6\n  save_steps: 2\n"))
        runs[name] = project
    straight = _launch(runs["straight"], runs["straight"] / "run")
    assert straight.returncode == 0, (straight.stdout + straight.stderr)[-4000:]
    killed_run = runs["killed"] / "run"
    first = _launch(runs["killed"], killed_run, KILL_AT_STEP="5")
    assert first.returncode != 0
    ckpts = sorted(p.name for p in (killed_run / "checkpoints" / "student").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    # each process's RNG state is in the checkpoint
    assert sorted(p.name for p in (killed_run / "checkpoints" / "student" / "checkpoint-4")
                  .glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    again = _launch(runs["killed"], killed_run)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-4000:]
    assert "resuming from" in log and "checkpoint-4" in log

    def student(run: Path) -> dict[str, Any]:
        info: dict[str, Any] = json.loads((run / "manifest.json").read_text())["stages"][
            "train"]["students"]["student"]
        return info

    a, b = student(runs["straight"] / "run"), student(killed_run)
    assert b["resumed_from_step"] == 4 and a["steps"] == b["steps"] == 6
    assert [s for s, _ in a["loss_history"]] == [s for s, _ in b["loss_history"]]
    for (_, la), (_, lb) in zip(a["loss_history"], b["loss_history"], strict=True):
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    wa = load_file(str(runs["straight"] / "run" / "student" / "model.safetensors"))
    wb = load_file(str(killed_run / "student" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
