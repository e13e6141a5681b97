"""Chain-of-thought generation: seed questions → teacher rationales → generation rows."""

from __future__ import annotations

from typing import Any

from distill.config import PipelineConfig
from distill.generate.parse import parse_response
from distill.generate.templates import chat_messages
from distill.records import empty_generation
from distill.teachers.base import Completion, Job, SamplingParams, cost_usd


def sampling_params(cfg: PipelineConfig) -> SamplingParams:
    g = cfg.generate
    return SamplingParams(temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens,
                          seed=g.seed if g.seed is not None else cfg.seed,
                          top_logprobs=cfg.teacher.top_logprobs)


def build_jobs(cfg: PipelineConfig, seeds: list[dict[str, Any]], samples: int | None = None
               ) -> list[Job]:
    params = sampling_params(cfg)
    n = samples or cfg.generate.samples_per_prompt
    prompt = cfg.resolve(cfg.generate.prompt)
    return [
        Job(key=s["id"], messages=chat_messages(prompt, cfg.generate.system_prompt,
                                                question=s["question"]),
            params=params, samples=list(range(n)))
        for s in seeds
    ]


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
        cost_usd=cost_usd(comp.prompt_tokens, comp.completion_tokens,
                          cfg.teacher.price_in_per_mtok, cfg.teacher.price_out_per_mtok),
        latency_s=round(comp.latency_s, 4),
        teacher=f"{cfg.teacher.backend}:{cfg.teacher.model}",
        error=comp.error,
    )
    if comp.top_logprobs is not None:
        row["top_logprobs"] = comp.top_logprobs
        row["token_ids"] = comp.token_ids
    return row
