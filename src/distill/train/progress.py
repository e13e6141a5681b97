"""A rich progress bar for transformers' Trainer (steps, loss, learning rate)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from distill.teachers.engine import make_progress


class RichProgressCallback(TrainerCallback):
    def __init__(self, label: str) -> None:
        self.label = label
        self.progress = make_progress()
        self.task: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.task = self.progress.add_task(f"train {self.label}", total=state.max_steps, info="")
        self.progress.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs and "loss" in logs and self.task is not None:
            self.progress.update(self.task, info=f"loss {logs['loss']:.4f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.progress.update(self.task, completed=state.global_step)
        self.progress.stop()
