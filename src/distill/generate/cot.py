"""Chain-of-thought generation: seed questions → teacher rationales → generation rows."""

from __future__ import annotations

from typing import Any

from distill.config import PipelineConfig
from distill.generate.parse import parse_response
from distill.generate.templates import chat_messages
from distill.records import empty_generation
from distill.teachers.base import Completion, Job, SamplingParams, completion_cost
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


def generation_row(cfg: PipelineConfig, seed: dict[str, Any], job: Job, sample: int,
                   comp: Completion) -> dict[str, Any]:
    row = empty_generation()
    parsed = parse_response(comp.text, comp.reasoning) if not comp.error else {}
    row.update(
        id=f"{seed['id']}#{sample}",
        seed_id=seed["id"],
        sample=sample,
        question=seed["question"],
        gold=seed.get("answer"),
        messages=job.messages,
        response=comp.text if not comp.error else None,
        reasoning=parsed.get("reasoning"),
        rationale=parsed.get("rationale"),
        answer=parsed.get("answer"),
        finish_reason=comp.finish_reason,
        prompt_tokens=comp.prompt_tokens,
        completion_tokens=comp.completion_tokens,
        cost_usd=completion_cost(comp, cfg.teacher.price_in_per_mtok,
                                 cfg.teacher.price_out_per_mtok),
        latency_s=round(comp.latency_s, 4),
        teacher=f"{cfg.teacher.backend}:{cfg.teacher.model}",
        error=comp.error,
    )
    # Every row has the same columns (a dataset takes its columns from the first row).
    row["teacher_served"] = comp.extra.get("served_model")
    if job.response_format is not None:
        row.update(structured_fields(comp.extra.get("parsed") if not comp.error else None))
    if comp.top_logprobs is not None:
        row["top_logprobs"] = comp.top_logprobs
        row["token_ids"] = comp.token_ids
    return row
