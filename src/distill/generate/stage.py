"""The generate stage: seeds → teacher → `generate/` (dataset + generations.jsonl)."""

from __future__ import annotations

from typing import Any

from distill.config import ConfigError, PipelineConfig
from distill.generate import batching, soft_targets
from distill.generate.cot import build_jobs, generation_row
from distill.generate.parse import parse_response
from distill.generate.templates import chat_messages
from distill.io import write_stage
from distill.records import RunDir, empty_generation
from distill.seeds import load_seeds, read_rows
from distill.teachers import make_teacher
from distill.teachers.cache import ResponseCache
from distill.teachers.engine import run_jobs


def imported_generations(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Bring-your-own generations: fill the schema's derived fields, keep what the file has."""
    path = cfg.resolve(cfg.generate.source or "")
    prompt = cfg.resolve(cfg.generate.prompt)
    out = []
    for i, r in enumerate(read_rows(path, "generate.source")):
        for f in ("question", "response"):
            if not isinstance(r.get(f), str):
                raise ConfigError(f"{cfg.generate.source}: row {i + 1}: missing field {f!r}")
        row = empty_generation() | r
        row.setdefault("seed_id", None)
        row["seed_id"] = row["seed_id"] or str(r.get("id", f"row-{i}")).split("#")[0]
        row["id"] = str(r.get("id") or f"{row['seed_id']}#{r.get('sample', 0)}")
        row["sample"] = int(r.get("sample") or 0)
        row["gold"] = None if row.get("gold") is None else str(row["gold"])
        if not row.get("messages"):
            # The prompt evaluate will put to the student (same template, same system prompt):
            # a student trained on the bare question would be scored on another prompt.
            row["messages"] = chat_messages(prompt, cfg.generate.system_prompt,
                                            question=row["question"])
        if row.get("rationale") is None or row.get("answer") is None:
            parsed = parse_response(row["response"], row.get("reasoning"))
            for k, v in parsed.items():
                if row.get(k) is None:
                    row[k] = v
        row["teacher"] = row.get("teacher") or f"file:{path.name}"
        out.append(row)
    return out


def run(cfg: PipelineConfig, run_dir: RunDir) -> dict[str, Any]:
    if cfg.generate.source:
        rows = imported_generations(cfg)
        stats: dict[str, Any] = {"imported": len(rows)}
    elif cfg.generate.task == "instruct":
        from distill.generate.instruct import generate_instructions

        rows, stats = generate_instructions(cfg, run_dir)
    elif cfg.generate.adaptive is not None:
        from distill.generate.adaptive import generate_adaptive

        rows, stats = generate_adaptive(cfg, run_dir)
    else:
        seeds = load_seeds(cfg)
        jobs = build_jobs(cfg, seeds)
        cache = ResponseCache(run_dir.cache)
        try:
            results, engine_stats = run_jobs(
                make_teacher(cfg.teacher, batch_record=batching.record_path(run_dir),
                             **soft_targets.teacher_options(cfg)), jobs, cache,
                price_in=cfg.teacher.price_in_per_mtok, price_out=cfg.teacher.price_out_per_mtok,
                description="generate", need_logprobs=bool(soft_targets.kd_needs_stored(cfg)),
            )
        finally:
            cache.close()
        by_id = {s["id"]: s for s in seeds}
        rows = [generation_row(cfg, by_id[job.key], job, s, results[(job.key, s)])
                for job in jobs for s in job.samples]
        soft_targets.enforce(cfg, rows)
        stats = engine_stats.as_dict() | {"seeds": len(seeds)} | soft_targets.manifest_note(
            cfg, rows)
    write_stage(run_dir.stage("generate"), rows, "generations.jsonl",
                extra=batching.carried(run_dir))
    stats.update(rows=len(rows), errors=sum(bool(r.get("error")) for r in rows),
                 prompt_tokens=sum(r.get("prompt_tokens") or 0 for r in rows),
                 completion_tokens=sum(r.get("completion_tokens") or 0 for r in rows),
                 cost_usd=round(sum(r.get("cost_usd") or 0.0 for r in rows), 6))
    return stats
