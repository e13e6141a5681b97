"""Training progress for transformers' Trainer: a rich bar on a terminal, plain lines elsewhere.

rich draws nothing until the end when stderr is not a terminal (a log file, CI, `nohup`), so
there the callback prints one line every `DISTILL_PROGRESS_EVERY` seconds (default 30) and one
at the end: step/total, the last logged loss, seconds per step and the time left.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from transformers import TrainerCallback

from distill.teachers.engine import make_progress

PROGRESS_EVERY_ENV = "DISTILL_PROGRESS_EVERY"
DEFAULT_EVERY_S = 30.0


def progress_interval() -> float:
    """Seconds between progress lines: `$DISTILL_PROGRESS_EVERY`, else 30."""
    raw = os.environ.get(PROGRESS_EVERY_ENV, "")
    try:
        return max(0.0, float(raw)) if raw.strip() else DEFAULT_EVERY_S
    except ValueError:
        return DEFAULT_EVERY_S


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(label: str, step: int, total: int, loss: float | None, elapsed: float,
                  steps_done: int, final: bool = False) -> str:
    """`train student: step 12/400 (3%) · loss 0.4123 · 2.31 s/step · 0:00:27 elapsed · ETA …`"""
    pct = f" ({100 * step // total}%)" if total > 0 else ""
    parts = [f"train {label}: step {step}/{total}{pct}"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if steps_done > 0:
        per = elapsed / steps_done
        parts.append(f"{per:.2f} s/step" if per >= 1 else f"{1 / per:.2f} steps/s")
    parts.append(f"{_clock(elapsed)} elapsed")
    if final:
        parts.append("done")
    elif steps_done > 0 and total > step:
        parts.append(f"ETA {_clock(elapsed / steps_done * (total - step))}")
    return " · ".join(parts)


class RichProgressCallback(TrainerCallback):
    """A rich bar when `stream` (default stderr) is a terminal, periodic lines otherwise."""

    def __init__(self, label: str, stream: TextIO | None = None,
                 every_s: float | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = progress_interval() if every_s is None else every_s
        isatty = getattr(self.stream, "isatty", None)
        self.lines = not (callable(isatty) and isatty())
        self.progress = None if self.lines else make_progress()
        self.task: Any = None
        self.loss: float | None = None
        self.started = self.last_line = 0.0
        self.first_step = 0

    def _print(self, state: Any, final: bool = False) -> None:
        now = time.perf_counter()
        self.last_line = now
        print(progress_line(self.label, state.global_step, state.max_steps, self.loss,
                            now - self.started, state.global_step - self.first_step, final),
              file=self.stream, flush=True)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.started = time.perf_counter()
        self.first_step = state.global_step
        if self.progress is None:
            self._print(state)
            return
        self.task = self.progress.add_task(f"train {self.label}", total=state.max_steps, info="")
        self.progress.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
        elif (time.perf_counter() - self.last_line >= self.every_s
              and state.global_step < state.max_steps):
            self._print(state)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if not logs or "loss" not in logs:
            return
        self.loss = float(logs["loss"])
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, info=f"loss {self.loss:.4f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.progress is None:
            self._print(state, final=True)
            return
        self.progress.update(self.task, completed=state.global_step)
        self.progress.stop()


class LogLastStep(TrainerCallback):
    """Log at the last optimizer step too, so the final loss is known even when
    `logging_steps` does not divide (or exceeds) the number of steps."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        if state.global_step >= state.max_steps:
            control.should_log = True
        return control


def training_callbacks(label: str) -> list[TrainerCallback]:
    """The callbacks every distill training run gets."""
    return [LogLastStep(), RichProgressCallback(label)]


def quiet_trainer(trainer: Any) -> Any:
    """Drop the Trainer's raw `{'loss': ...}` prints (`disable_tqdm` makes it add a
    PrinterCallback) unless `distill -v`: distill's own progress lines say the same."""
    from transformers.trainer_callback import PrinterCallback

    from distill.quiet import verbose

    if not verbose():
        trainer.remove_callback(PrinterCallback)
    return trainer
