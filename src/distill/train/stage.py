"""The train stage: `sft/` → `student/` (plus the label-only ablation and the `train.also`
soft-target students when asked)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datasets import Dataset

from distill.config import ConfigError, PipelineConfig
from distill.io import read_stage_rows
from distill.records import RunDir
from distill.train.dataset import label_only_rows


def run(cfg: PipelineConfig, run_dir: RunDir) -> dict[str, Any]:
    rows = read_stage_rows(run_dir.stage("sft"), "sft.jsonl")
    if not rows:
        raise ConfigError(f"{run_dir.stage('sft')}: the training set is empty (every row was "
                          "filtered out; see filter/funnel.json)")
    students: dict[str, Any] = {}
    method = cfg.train.method
    data = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    curves = DevCurves(cfg, rows)
    if method == "sft":
        from distill.train.sft import train_sft

        students["student"] = curves.run("student", lambda cb: train_sft(
            cfg, data, run_dir.stage("student"), label="student", callbacks=cb))
    else:
        from distill.train.kd import train_kd

        students["student"] = curves.run("student", lambda cb: train_kd(
            cfg, run_dir, rows, run_dir.stage("student"), callbacks=cb))
    students["student"]["dir"] = "student"
    for extra in dict.fromkeys(cfg.train.also):  # same-size soft-target students, side by side
        if extra == method:
            continue
        from distill.train.kd import train_kd

        extra_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
            update={"method": extra})})
        info = curves.run(extra, lambda cb, c=extra_cfg, e=extra: train_kd(
            c, run_dir, rows, run_dir.stage(f"student_{e}"), label=e, callbacks=cb))
        students[extra] = info | {"dir": f"student_{extra}"}
    if cfg.train.label_only_baseline:
        from distill.train.sft import train_sft

        lo = label_only_rows(rows)
        lo_data = Dataset.from_list([{"messages": r["messages"]} for r in lo])
        # The same number of optimizer steps as the CoT student: one row per question makes an
        # epoch shorter, and the ablation should not lose for want of updates.
        lo_cfg = cfg
        if cfg.train.max_steps <= 0 and students["student"].get("steps"):
            lo_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
                update={"max_steps": int(students["student"]["steps"])})})
        info = curves.run("label_only", lambda cb: train_sft(
            lo_cfg, lo_data, run_dir.stage("student_label_only"), label="label-only",
            callbacks=cb))
        students["label_only"] = info | {"dir": "student_label_only"}
    return {"students": students, "method": method} | curves.summary(students)


class DevCurves:
    """One `DevCurveCallback` per student when `train.dev` is set; a no-op otherwise."""

    def __init__(self, cfg: PipelineConfig, rows: list[dict[str, Any]]) -> None:
        self.cfg, self.items = cfg, None
        if cfg.train.dev is not None:
            from distill.train.devcurve import load_dev_items

            self.items = load_dev_items(cfg, {r["question"] for r in rows})

    def run(self, name: str, train: Callable[[list[Any]], dict[str, Any]]) -> dict[str, Any]:
        if self.items is None:
            return train([])
        from distill.train.devcurve import DevCurveCallback
        from distill.train.student import load_tokenizer

        cb = DevCurveCallback(self.cfg, load_tokenizer(self.cfg), self.items)
        return train([cb]) | cb.info()

    def summary(self, students: dict[str, Any]) -> dict[str, Any]:
        """Steps each student took to reach the main student's final dev accuracy."""
        main = students.get("student", {}).get("dev_curve")
        if self.items is None or not main:
            return {}
        from distill.train.devcurve import steps_to_reach

        level = main[-1][1]
        return {"dev_target": level, "steps_to_dev_target": {
            n: steps_to_reach(s["dev_curve"], level) for n, s in students.items()
            if s.get("dev_curve")}}
