"""The train stage: `sft/` → `student/` (plus the label-only ablation and the `train.also`
soft-target students when asked)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.config import ConfigError, PipelineConfig
from distill.io import read_stage_rows
from distill.records import RunDir
from distill.stages import Stage
from distill.train.dataset import label_only_rows

if TYPE_CHECKING:
    from datasets import Dataset

TrainFn = Callable[..., dict[str, Any]]
"""`(cfg, run_dir, rows, out_dir, *, label=..., callbacks=None) -> info`: sft rows → a student
saved in `out_dir`. Without `label` each method names its student itself ("student" for SFT,
else the method's name)."""


def _messages(rows: list[dict[str, Any]]) -> Dataset:
    from datasets import Dataset  # not at import: loading a config reads this module's STAGE

    return Dataset.from_list([{"messages": r["messages"]} for r in rows])


# Each method's module is imported when it trains, not here: describing the stage (`STAGE`, read
# by config checks and every pipeline command) should not cost a transformers Trainer/TRL import.


def _sft(cfg: PipelineConfig, run_dir: RunDir | None, rows: list[dict[str, Any]],
         out_dir: Path, **kw: Any) -> dict[str, Any]:
    from distill.train.sft import train_sft

    return train_sft(cfg, _messages(rows), out_dir, **kw)


def _kd(cfg: PipelineConfig, run_dir: RunDir | None, rows: list[dict[str, Any]],
        out_dir: Path, **kw: Any) -> dict[str, Any]:
    from distill.train.kd import train_kd

    return train_kd(cfg, run_dir, rows, out_dir, **kw)


def _gkd(cfg: PipelineConfig, run_dir: RunDir | None, rows: list[dict[str, Any]],
         out_dir: Path, **kw: Any) -> dict[str, Any]:
    from distill.train.gkd import train_gkd

    return train_gkd(cfg, rows, out_dir, **kw)


TRAINERS: dict[str, TrainFn] = {"sft": _sft, "kd": _kd, "gkd": _gkd}
"""`train.method` (and `train.also`) → the function that trains that student."""


def _with_train(cfg: PipelineConfig, **train: Any) -> PipelineConfig:
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})


def _job(method: str, cfg: PipelineConfig, run_dir: RunDir, rows: list[dict[str, Any]],
         out: str, **kw: Any) -> Callable[[list[Any]], dict[str, Any]]:
    """Training `method`'s student into `run_dir/out`, given its (dev-curve) callbacks."""
    return lambda cb: TRAINERS[method](cfg, run_dir, rows, run_dir.stage(out), callbacks=cb,
                                       **kw)


def run(cfg: PipelineConfig, run_dir: RunDir) -> dict[str, Any]:
    rows = read_stage_rows(run_dir.stage("sft"), "sft.jsonl")
    if not rows:
        raise ConfigError(f"{run_dir.stage('sft')}: the training set is empty (every row was "
                          "filtered out; see filter/funnel.json)")
    students: dict[str, Any] = {}
    method = cfg.train.method
    curves = DevCurves(cfg, rows)
    students["student"] = curves.run("student", _job(method, cfg, run_dir, rows, "student"))
    students["student"]["dir"] = "student"
    for extra in dict.fromkeys(cfg.train.also):  # same-size soft-target students, side by side
        if extra == method:
            continue
        info = curves.run(extra, _job(extra, _with_train(cfg, method=extra), run_dir, rows,
                                      f"student_{extra}", label=extra))
        students[extra] = info | {"dir": f"student_{extra}"}
    if cfg.train.label_only_baseline:
        lo = label_only_rows(rows)
        # The same number of optimizer steps as the CoT student: one row per question makes an
        # epoch shorter, and the ablation should not lose for want of updates.
        lo_cfg = cfg
        if cfg.train.max_steps <= 0 and students["student"].get("steps"):
            lo_cfg = _with_train(cfg, max_steps=int(students["student"]["steps"]))
        info = curves.run("label_only", _job("sft", lo_cfg, run_dir, lo, "student_label_only",
                                             label="label-only"))
        students["label_only"] = info | {"dir": "student_label_only"}
    from distill.train.checkpoints import remove_all

    remove_all(run_dir.root)  # every student is saved: no checkpoint is needed any more
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


STAGE = Stage(
    name="train", run=run, sections=("train", "seed"), reads=("sft/sft.jsonl",),
    inputs=lambda cfg: [("train.dev.dataset", cfg.train.dev.dataset if cfg.train.dev else None)],
    models=lambda cfg: [("train.student", cfg.train.student, "model"),
                        ("train.tokenizer", cfg.train.tokenizer, "tokenizer")])
