"""The filter stage: `generate/` → `filter/` (all rows, reasons, funnel) and `sft/`.

The chain of filters itself is `distill.filter.chain`; this module is its I/O and the stage's
entry in the stage table (`STAGE`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from distill.config import PipelineConfig, TeacherConfig
from distill.filter.chain import filter_rows
from distill.io import read_stage_rows, write_stage
from distill.records import RunDir
from distill.stages import Stage
from distill.teachers.cache import ResponseCache
from distill.train.dataset import sft_rows


def run(cfg: PipelineConfig, run_dir: RunDir) -> dict[str, Any]:
    rows = read_stage_rows(run_dir.stage("generate"), "generations.jsonl")
    n_in = len(rows)
    cache = ResponseCache(run_dir.cache)
    try:
        filtered, funnel = filter_rows(_handed_over(rows), cfg, cache)
    finally:
        cache.close()
    write_stage(run_dir.stage("filter"), filtered, "filtered.jsonl", {"funnel.json": funnel})
    kept = [r for r in filtered if r["keep"]]
    sft = sft_rows(kept)
    from distill.formats import dataset_card, teacher_provenance, write_formats
    from distill.generate.batching import record_path

    # Who answered, beside the configured teacher: teacher_served of the kept rows (the sft
    # rows do not carry it) and the Batch API ids from generate/batches.json.
    provenance = teacher_provenance(kept, record_path(run_dir))
    write_stage(run_dir.stage("sft"), sft, "sft.jsonl",
                {"README.md": dataset_card(cfg, funnel, len(sft), provenance)},
                allow_empty=True)

    formats = write_formats(run_dir.stage("sft"), sft)
    return {"in": n_in, "kept": len(kept), "sft_rows": len(sft),
            "seeds_covered": len({r["seed_id"] for r in kept}), "sft_formats": formats}


def _handed_over(rows: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The rows one at a time, each let go of as the chain copies it (`chain._prepare`), so the
    generation rows and the filtered copies are not both held whole (emptied: `rows` is ours)."""
    rows.reverse()
    while rows:
        yield rows.pop()


def _inputs(cfg: PipelineConfig) -> list[tuple[str, str | None]]:
    """The judge's prompt and the held-out sets to decontaminate against."""
    f = cfg.filter
    files: list[tuple[str, str | None]] = []
    if f.judge is not None:
        files.append(("filter.judge.prompt", f.judge.prompt))
    if f.decontaminate is not None:
        files += [(f"filter.decontaminate.against.{i}", p)
                  for i, p in enumerate(f.decontaminate.against)]
    return files


def _teachers(cfg: PipelineConfig) -> list[tuple[str, TeacherConfig]]:
    """The judge: its own teacher, else the generating one."""
    judge = cfg.filter.judge
    if judge is None:
        return []
    return [("filter.judge.teacher", judge.teacher) if judge.teacher is not None
            else ("teacher", cfg.teacher)]


STAGE = Stage(name="filter", run=run, sections=("filter",), inputs=_inputs,
              reads=("generate/generations.jsonl",),
              rows=("filter/filtered.jsonl", "sft/sft.jsonl"), teachers=_teachers)
