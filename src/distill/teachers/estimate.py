"""What a generation run would send and cost, before sending anything (`distill run --dry-run`).

Prompt tokens use the common ~4 characters per token heuristic; completion tokens are the
worst case (`max_tokens` for every sample), so the cost is an upper bound for plain models.
With `teacher.batch` the cost is at the batch price (`batch_price_factor`), one request per
sample, and `batches` says how many batch files the run splits into.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from distill.config import TeacherConfig
from distill.teachers.base import Job, cost_usd

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
"""Role markers and separators a chat template adds around each message."""


def estimate_prompt_tokens(messages: list[dict[str, str]]) -> int:
    chars = sum(len(str(m.get("content", ""))) for m in messages)
    return chars // CHARS_PER_TOKEN + MESSAGE_OVERHEAD_TOKENS * len(messages)


def estimate(cfg: TeacherConfig, jobs: Sequence[Job]) -> dict[str, Any]:
    """Request count, token and cost estimates for completing every sample of `jobs`.

    `requests` assumes the server takes `n` samples per request (one request per prompt);
    `requests_if_no_n` is the count when it does not. Prompt tokens are billed once per request.
    """
    prompts = [j for j in jobs if j.samples]
    samples = sum(len(j.samples) for j in prompts)
    prompt_tokens = sum(estimate_prompt_tokens(j.messages) for j in prompts)
    prompt_tokens_no_n = sum(estimate_prompt_tokens(j.messages) * len(j.samples) for j in prompts)
    max_completion = sum(j.params.max_tokens * len(j.samples) for j in prompts)
    price_in, price_out = cfg.price_in_per_mtok, cfg.price_out_per_mtok
    cost = cost_usd(prompt_tokens, max_completion, price_in, price_out)
    out: dict[str, Any] = {
        "backend": cfg.backend,
        "model": cfg.model,
        "prompts": len(prompts),
        "samples": samples,
        "requests": len(prompts),
        "requests_if_no_n": samples,
        "est_prompt_tokens": prompt_tokens,
        "max_completion_tokens": max_completion,
        "est_cost_usd": round(cost, 6),
        "est_cost_usd_if_no_n": round(
            cost_usd(prompt_tokens_no_n, max_completion, price_in, price_out), 6),
        "max_cost_usd": cfg.max_cost_usd,
    }
    if cfg.batch:
        cost = _batch(cfg, prompts, out, prompt_tokens_no_n, max_completion)
    out["within_budget"] = None if cfg.max_cost_usd is None else cost <= cfg.max_cost_usd
    return out


def _batch(cfg: TeacherConfig, jobs: Sequence[Job], out: dict[str, Any], prompt_tokens: int,
           max_completion: int) -> float:
    """`teacher.batch`: one line per sample, at the batch price; how many batch files."""
    from distill.teachers.batch_files import make_line, split_lines

    online = cost_usd(prompt_tokens, max_completion, cfg.price_in_per_mtok,
                      cfg.price_out_per_mtok)
    cost = online * cfg.batch_price_factor
    lines = [make_line(cfg, "openai", j, s) for j in jobs for s in j.samples]
    chunks = split_lines(lines, cfg.batch_max_requests, cfg.batch_max_bytes)
    out.update(requests=len(lines), est_prompt_tokens=prompt_tokens,
               est_cost_usd=round(cost, 6), est_cost_usd_online=round(online, 6),
               batch_price_factor=cfg.batch_price_factor, batches=len(chunks),
               batch_bytes=sum(len(line.data) for line in lines))
    for k in ("requests_if_no_n", "est_cost_usd_if_no_n"):
        out.pop(k, None)
    return cost
