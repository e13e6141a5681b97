"""Chain-of-thought generation: seed questions → teacher rationales → generation rows."""

from __future__ import annotations

from typing import Any

from distill.answers import parse_response
from distill.config import PipelineConfig
from distill.generate import soft_targets
from distill.generate.templates import chat_messages
from distill.records import GenerationRow, RunDir, make_generation_row
from distill.teachers.base import Completion, Job, SamplingParams, Teacher
from distill.teachers.cache import ResponseCache
from distill.teachers.engine import run_jobs
from distill.teachers.structured import response_format


def sampling_params(cfg: PipelineConfig) -> SamplingParams:
    g = cfg.generate
    return SamplingParams(temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens,
                          seed=g.seed if g.seed is not None else cfg.seed,
                          top_logprobs=cfg.teacher.top_logprobs)


def structured_format(cfg: PipelineConfig) -> dict[str, Any] | None:
    """`generate.response_format` as the request's `response_format` (None: free text)."""
    return response_format(cfg.generate.response_format, search=cfg.resolve("."))


def build_jobs(cfg: PipelineConfig, seeds: list[dict[str, Any]], samples: int | None = None
               ) -> list[Job]:
    params = sampling_params(cfg)
    n = samples or cfg.generate.samples_per_prompt
    prompt = cfg.resolve(cfg.generate.prompt)
    fmt = structured_format(cfg)
    return [
        Job(key=s["id"], messages=chat_messages(prompt, cfg.generate.system_prompt,
                                                question=s["question"]),
            params=params, samples=list(range(n)), response_format=fmt)
        for s in seeds
    ]


def structured_fields(parsed: Any) -> dict[str, Any]:
    """Row fields a structured response fills: `extra.parsed` (`extra` is stored as JSON text in
    the dataset, whatever the schema), and `rationale` / `answer` when the schema has them (the
    filter verifies `answer` against gold as for free text)."""
    out: dict[str, Any] = {"extra": {"parsed": parsed}}
    if isinstance(parsed, dict):
        if isinstance(parsed.get("rationale"), str):
            out["rationale"] = parsed["rationale"]
        if parsed.get("answer") is not None:
            out["answer"] = str(parsed["answer"])
    return out


def teacher_name(cfg: PipelineConfig) -> str:
    """The rows' `teacher`: backend and model as configured."""
    return f"{cfg.teacher.backend}:{cfg.teacher.model}"


def generation_row(cfg: PipelineConfig, seed: dict[str, Any], job: Job, sample: int,
                   comp: Completion) -> GenerationRow:
    """The row of one chain-of-thought sample (`records.make_generation_row`): rationale and
    answer parsed from the response; a structured response (`generate.response_format`) fills
    them from its JSON."""
    fields: dict[str, Any] = {}
    if job.response_format is not None:  # every row the same columns, failed ones too
        fields = structured_fields(comp.extra.get("parsed") if not comp.error else None)
    return make_generation_row(
        seed_id=seed["id"], sample=sample, question=seed["question"], gold=seed.get("answer"),
        messages=job.messages, teacher=teacher_name(cfg), completion=comp,
        parsed=parse_response(comp.text, comp.reasoning) if not comp.error else None,
        price_in=cfg.teacher.price_in_per_mtok, price_out=cfg.teacher.price_out_per_mtok,
        **fields)


def generate_cot(cfg: PipelineConfig, run_dir: RunDir, teacher: Teacher,
                 seeds: list[dict[str, Any]], *, description: str = "generate",
                 show_progress: bool = True) -> tuple[list[GenerationRow], dict[str, Any]]:
    """`generate.samples` rationales per seed from `teacher` through the run's cache: the rows
    and the stats (engine counters, seeds, the soft-target note). The local stage, a Ray shard
    and the Ray Data LLM fleet all generate through here."""
    jobs = build_jobs(cfg, seeds)
    with ResponseCache(run_dir.cache) as cache:
        results, engine = run_jobs(
            teacher, jobs, cache, price_in=cfg.teacher.price_in_per_mtok,
            price_out=cfg.teacher.price_out_per_mtok, description=description,
            show_progress=show_progress, need_logprobs=bool(soft_targets.kd_needs_stored(cfg)))
    by_id = {s["id"]: s for s in seeds}
    rows = [generation_row(cfg, by_id[job.key], job, s, results[(job.key, s)])
            for job in jobs for s in job.samples]
    soft_targets.enforce(cfg, rows)
    return rows, engine.as_dict() | {"seeds": len(seeds)} | soft_targets.manifest_note(cfg, rows)
