"""The train stage: `sft/` → `student/` (plus the label-only ablation and the `train.also`
soft-target students when asked)."""

from __future__ import annotations

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
    if method == "sft":
        from distill.train.sft import train_sft

        students["student"] = train_sft(cfg, data, run_dir.stage("student"), label="student")
    else:
        from distill.train.kd import train_kd

        students["student"] = train_kd(cfg, run_dir, rows, run_dir.stage("student"))
    students["student"]["dir"] = "student"
    for extra in dict.fromkeys(cfg.train.also):  # same-size soft-target students, side by side
        if extra == method:
            continue
        from distill.train.kd import train_kd

        extra_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
            update={"method": extra})})
        info = train_kd(extra_cfg, run_dir, rows, run_dir.stage(f"student_{extra}"), label=extra)
        students[extra] = info | {"dir": f"student_{extra}"}
    if cfg.train.label_only_baseline:
        from distill.train.sft import train_sft

        lo = label_only_rows(rows)
        lo_data = Dataset.from_list([{"messages": r["messages"]} for r in lo])
        info = train_sft(cfg, lo_data, run_dir.stage("student_label_only"), label="label-only")
        students["label_only"] = info | {"dir": "student_label_only"}
    return {"students": students, "method": method}
