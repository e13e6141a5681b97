"""Training checkpoints and automatic resume, the same for every method (sft, kd, gkd,
cross-tokenizer kd), under accelerate/DDP too.

Each student trains in `RUN_DIR/checkpoints/<student dir>/`: transformers' Trainer writes
`checkpoint-<step>/` there every `train.save_steps` steps and/or `train.save_minutes` minutes
(weights or the LoRA adapter, optimizer, scheduler, RNG states, trainer state with the loss log),
keeping the last `train.save_total_limit`. distill adds `distill_state.json` to each (what its
own callbacks hold, e.g. the dev curve so far, and the training seconds before this process) and
`projections.safetensors` when hidden-state projections train alongside the student.

A checkpoint counts only once both `trainer_state.json` and `distill_state.json` are in it (they
are written last), so one cut short by SIGKILL is skipped and removed. `job.json` holds the key of
the training job (method, student, the train config but its save cadence, the seed, the rows): a
checkpoint of another job is never resumed; it is removed with a note. When the student is saved
its checkpoints go and `finished.json` stays (its info), so a rerun of a train stage killed
while training a later student (`train.also`, the label-only baseline) does not retrain this
one; the train stage removes `RUN_DIR/checkpoints/` when it finishes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from transformers import TrainerCallback

from distill.config import PipelineConfig
from distill.records import atomic_path, dumps_bytes, fingerprint

ROOT_NAME = "checkpoints"
STATE_FILE = "distill_state.json"
PROJECTIONS_FILE = "projections.safetensors"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
# The Trainer's own: a checkpoint has it once its model, optimizer and RNG files are written.
_TRAINER_STATE = "trainer_state.json"
_CADENCE = ("save_steps", "save_minutes", "save_total_limit")

console = Console(stderr=True)


def is_main_process() -> bool:
    """Not a secondary rank of a distributed launch (torchrun / accelerate set RANK)."""
    return os.environ.get("RANK", "0") in ("", "0")


def rows_digest(rows: Any) -> str:
    """A content hash of the training rows (dicts or a datasets.Dataset)."""
    h = hashlib.sha256()
    for r in rows:
        h.update(dumps_bytes(r))
    return h.hexdigest()[:16]


def checkpoint_root(out_dir: Path) -> Path:
    """Where the student saved to `out_dir` keeps its checkpoints."""
    return out_dir.parent / ROOT_NAME / out_dir.name


def complete(path: Path) -> bool:
    return (path / _TRAINER_STATE).is_file() and (path / STATE_FILE).is_file()


def _steps(root: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in root.glob("checkpoint-*")
             if p.is_dir() and (m := _CKPT.match(p.name))]
    return sorted(found)


class Checkpoints:
    """The checkpoints of one student's training job."""

    def __init__(self, cfg: PipelineConfig, out_dir: Path, method: str, label: str,
                 rows: Any) -> None:
        self.cfg, self.label = cfg, label
        self.root = checkpoint_root(out_dir)
        self.out_dir = out_dir
        train = {k: v for k, v in cfg.train.model_dump(mode="json").items()
                 if k not in _CADENCE}
        self.key = fingerprint(method, label, out_dir.name, train, cfg.seed, rows_digest(rows))
        t = cfg.train
        self.enabled = t.save_steps is not None or t.save_minutes is not None
        self.resumed_step: int | None = None

    # --- before training ---------------------------------------------------------------------

    def finished(self) -> dict[str, Any] | None:
        """The info of this job's student when an earlier, interrupted run of the stage already
        trained and saved it (None: train it)."""
        path = self.root / "finished.json"
        if not path.is_file() or not (self.out_dir / "config.json").is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except ValueError:
            return None
        if data.get("key") != self.key:
            return None
        console.print(f"[dim]train {self.label}: already trained by an interrupted run of this "
                      f"stage ({self.out_dir.name}/), kept[/dim]", highlight=False)
        info: dict[str, Any] = data["info"]
        return info

    def resume_from(self) -> str | None:
        """The last complete checkpoint of this job (None: start at step 0). Checkpoints of
        another job, and incomplete ones, are removed."""
        job = self.root / "job.json"
        try:
            same = json.loads(job.read_text()).get("key") == self.key
        except (OSError, ValueError):
            same = False
        if not is_main_process():
            # Rank 0 tidies; every rank resumes from the same (complete) checkpoint.
            good = [p for _, p in _steps(self.root) if complete(p)] if same else []
            return str(good[-1]) if good else None
        if self.root.exists() and not same:
            if _steps(self.root):
                console.print(f"[yellow]note:[/yellow] train {self.label}: checkpoints in "
                              f"{self.root} are of another training job (config or rows "
                              "changed); starting at step 0", highlight=False)
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(job) as tmp:
            tmp.write_text(json.dumps({"key": self.key, "label": self.label}))
        last = None
        for _step, path in _steps(self.root):
            if complete(path):
                last = path
            else:  # cut short (SIGKILL while saving): never resumed, not kept
                console.print(f"[dim]train {self.label}: removing incomplete checkpoint "
                              f"{path.name}[/dim]", highlight=False)
                shutil.rmtree(path, ignore_errors=True)
        if last is not None:
            console.print(f"train {self.label}: resuming from {last} (step "
                          f"{last.name.split('-')[1]})", highlight=False)
        return str(last) if last is not None else None

    def info(self) -> dict[str, Any]:
        """What the student's info says about resuming (`resumed_from_step`: None when it
        trained in one go)."""
        return {"resumed_from_step": self.resumed_step}

    def trainer_kwargs(self) -> dict[str, Any]:
        """TrainingArguments fields: the output dir and the save cadence."""
        t = self.cfg.train
        if not self.enabled:
            return {"output_dir": str(self.root), "save_strategy": "no"}
        return {"output_dir": str(self.root), "save_strategy": "steps",
                # minutes only: no step-count saves (SaveEveryMinutes asks for them)
                "save_steps": t.save_steps if t.save_steps is not None else 10**9,
                "save_total_limit": t.save_total_limit, "save_only_model": False}

    # --- after training ----------------------------------------------------------------------

    def done(self, info: dict[str, Any]) -> None:
        """The student is saved: drop the checkpoints, keep its info for a rerun."""
        if not is_main_process():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for _, path in _steps(self.root):
            shutil.rmtree(path, ignore_errors=True)
        with atomic_path(self.root / "finished.json") as tmp:
            tmp.write_text(json.dumps({"key": self.key, "info": info}, default=str))


def remove_all(run_root: Path) -> None:
    """The train stage finished: no checkpoint is needed any more."""
    if is_main_process():
        shutil.rmtree(run_root / ROOT_NAME, ignore_errors=True)


class GracefulInterrupt:
    """`with GracefulInterrupt(label) as stop:` the first Ctrl-C (SIGINT) asks training to stop
    at the end of the optimizer step it is in, after a checkpoint of it (`stop.requested`); a
    second one interrupts at once. A KeyboardInterrupt is raised when the block ends, so the
    run stops as any interrupted run does (the CLI: exit 1, one line) and the rerun resumes
    from that checkpoint. Outside the main thread it changes nothing."""

    def __init__(self, label: str, checkpoint: bool = True) -> None:
        self.label, self.checkpoint = label, checkpoint
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        then = "with a checkpoint" if self.checkpoint else "(checkpoints are off)"
        console.print(f"train {self.label}: interrupted; stopping after this step {then} "
                      "(Ctrl-C again to stop now)", highlight=False)

    def __enter__(self) -> GracefulInterrupt:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self.requested and exc_type is None:
            raise KeyboardInterrupt


class CheckpointExtras(TrainerCallback):
    """Adds distill's own state to each checkpoint the Trainer writes, and puts it back on
    resume: the state of callbacks with `checkpoint_state()` / `restore_checkpoint_state()`
    (the dev curve), the training seconds so far, and the hidden-state projections.

    Also asks for a checkpoint every `save_minutes` (on every rank at the same step: rank 0's
    clock decides and is broadcast)."""

    def __init__(self, trainer: Any, minutes: float | None,
                 interrupt: GracefulInterrupt | None = None, enabled: bool = True) -> None:
        self.trainer, self.interrupt, self.enabled = trainer, interrupt, enabled
        self.every_s = minutes * 60 if minutes is not None else None
        self.started = self.last_save = time.monotonic()
        self.seconds_before = 0.0
        self.resumed_from: int | None = None

    def _stateful(self) -> list[Any]:
        return [cb for cb in self.trainer.callback_handler.callbacks
                if hasattr(cb, "checkpoint_state") and cb is not self]

    def restore(self, checkpoint: str) -> None:
        path = Path(checkpoint)
        data = json.loads((path / STATE_FILE).read_text())
        self.seconds_before = float(data.get("train_s", 0.0))
        self.resumed_from = int(data.get("step", 0))
        by_name = data.get("callbacks", {})
        for cb in self._stateful():
            if type(cb).__name__ in by_name:
                cb.restore_checkpoint_state(by_name[type(cb).__name__])
        projections = getattr(self.trainer, "projections", None)
        if projections is not None and (path / PROJECTIONS_FILE).is_file():
            from safetensors.torch import load_file

            projections.load_state_dict(load_file(str(path / PROJECTIONS_FILE)))

    def train_seconds(self) -> float:
        return self.seconds_before + time.monotonic() - self.started

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        due = self.every_s is not None and time.monotonic() - self.last_save >= self.every_s
        stop = self.interrupt is not None and self.interrupt.requested
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            # Every rank saves and stops at the same step: rank 0's clock decides when to save;
            # a Ctrl-C seen by any rank stops all.
            flags = torch.tensor([int(due), int(stop)], device=args.device)
            dist.broadcast(flags[:1], 0)
            dist.all_reduce(flags[1:], op=dist.ReduceOp.MAX)
            due, stop = bool(flags[0].item()), bool(flags[1].item())
            if stop and self.interrupt is not None:
                self.interrupt.requested = True
        if stop:
            control.should_training_stop = True
        if (due or stop) and self.enabled:
            control.should_save = True
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        self.last_save = time.monotonic()
        if not state.is_world_process_zero:
            return control
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not path.is_dir():
            return control
        projections = getattr(self.trainer, "projections", None)
        if projections is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous()
                       for k, v in projections.state_dict().items()},
                      str(path / PROJECTIONS_FILE))
        data = {"step": state.global_step, "train_s": round(self.train_seconds(), 3),
                "callbacks": {type(cb).__name__: cb.checkpoint_state()
                              for cb in self._stateful()}}
        with atomic_path(path / STATE_FILE) as tmp:
            tmp.write_text(json.dumps(data))
        return control
