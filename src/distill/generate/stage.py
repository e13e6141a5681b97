"""The generate stage: seeds → teacher → `generate/` (dataset + generations.jsonl)."""

from __future__ import annotations

from typing import Any, cast

from distill.config import PipelineConfig
from distill.generate import batching, soft_targets
from distill.generate.cot import generate_cot
from distill.generate.imported import imported_generations
from distill.io import write_stage
from distill.records import GenerationRow, RunDir
from distill.seeds import load_seeds
from distill.stages import Stage
from distill.teachers import make_teacher


def run(cfg: PipelineConfig, run_dir: RunDir) -> dict[str, Any]:
    rows: list[GenerationRow] | list[dict[str, Any]]  # built here, or read back from shards
    if cfg.generate.source:
        rows = imported_generations(cfg)
        stats: dict[str, Any] = {"imported": len(rows)}
    elif cfg.executor.kind == "ray":  # seeds in shards on a Ray cluster (distill.executor)
        from distill.executor.ray_generate import generate

        rows, stats = generate(cfg, run_dir)
    elif cfg.generate.task == "instruct":
        from distill.generate.instruct import generate_instructions

        rows, stats = generate_instructions(cfg, run_dir)
    elif cfg.generate.adaptive is not None:
        from distill.generate.adaptive import generate_adaptive

        rows, stats = generate_adaptive(cfg, run_dir)
    else:
        teacher = make_teacher(cfg.teacher, batch_record=batching.record_path(run_dir),
                               **soft_targets.teacher_options(cfg))
        rows, stats = generate_cot(cfg, run_dir, teacher, load_seeds(cfg))
        stats |= batching.stats(teacher)
    # The writers take rows as plain dicts; `GenerationRow` is the schema they were built to.
    write_stage(run_dir.stage("generate"), cast(list[dict[str, Any]], rows), "generations.jsonl",
                extra=batching.carried(run_dir))
    stats.update(rows=len(rows), errors=sum(bool(r.get("error")) for r in rows),
                 prompt_tokens=sum(r.get("prompt_tokens") or 0 for r in rows),
                 completion_tokens=sum(r.get("completion_tokens") or 0 for r in rows),
                 cost_usd=round(sum(r.get("cost_usd") or 0.0 for r in rows), 6))
    return stats


def _inputs(cfg: PipelineConfig) -> list[tuple[str, str | None]]:
    """The seeds, an imported generations file, and the templates rendered for the teacher."""
    g = cfg.generate
    files = [("seeds.path", cfg.seeds.path), ("generate.source", g.source)]
    if not g.source:
        files.append(("generate.prompt", g.prompt))
    if g.task == "instruct" and not g.source:
        from distill.config import SelfInstructConfig

        si = g.self_instruct or SelfInstructConfig()
        files += [("generate.self_instruct.seed_tasks", si.seed_tasks),
                  ("generate.self_instruct.prompt", si.prompt),
                  ("generate.self_instruct.answer_prompt", si.answer_prompt)]
        if si.evolve_rounds:
            files.append(("generate.self_instruct.evolve_prompt", si.evolve_prompt))
    return files


STAGE = Stage(name="generate", run=run, sections=("seeds", "generate", "teacher", "seed"),
              inputs=_inputs, rows=("generate/generations.jsonl",),
              teachers=lambda cfg: [] if cfg.generate.source else [("teacher", cfg.teacher)])
