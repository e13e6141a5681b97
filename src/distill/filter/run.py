"""The filter stage's I/O: `generate/` → `filter/` (all rows, reasons, funnel) and `sft/`."""

from __future__ import annotations

from typing import Any

from distill.config import PipelineConfig
from distill.filter.stage import filter_rows
from distill.io import read_stage_rows, write_stage
from distill.records import RunDir
from distill.teachers.cache import ResponseCache
from distill.train.dataset import sft_rows


def run(cfg: PipelineConfig, run_dir: RunDir) -> dict[str, Any]:
    rows = read_stage_rows(run_dir.stage("generate"), "generations.jsonl")
    cache = ResponseCache(run_dir.cache)
    try:
        filtered, funnel = filter_rows(rows, cfg, cache)
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
    return {"in": len(rows), "kept": len(kept), "sft_rows": len(sft),
            "seeds_covered": len({r["seed_id"] for r in kept}), "sft_formats": formats}
