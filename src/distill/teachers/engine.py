"""Runs jobs through the cache and a teacher, with a progress bar and cost accounting.

The cache and the progress bar wrap any backend: a backend only ever sees the samples the cache
does not already hold, and each completion is written to the cache as soon as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from distill.teachers.base import Completion, Job, Teacher, completion_cost
from distill.teachers.cache import ResponseCache, cache_key


@dataclass
class EngineStats:
    requested: int = 0
    cached: int = 0
    sent: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    budget_stopped: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "notes"} | {"notes": self.notes}

    def add(self, other: EngineStats) -> None:
        """Count `other` (another run of the same stage) in as well."""
        for k in ("requested", "cached", "sent", "failed", "prompt_tokens", "completion_tokens"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.cost_usd += other.cost_usd
        self.budget_stopped |= other.budget_stopped
        self.notes += other.notes


PROGRESS_EVERY_S = 0.1
"""The bar's counts are updated at most this often (not once per completion: at ~1,000
completions/s the updates alone cost more CPU than the HTTP client)."""


def make_progress(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=transient,
    )


def progress_info(stats: EngineStats, teacher: Teacher, started: float) -> str:
    """One status line: done, failed, in flight (backends that know), tokens, $, rate."""
    elapsed = max(time.perf_counter() - started, 1e-9)
    in_flight = getattr(teacher, "in_flight", None)
    flight = f" · in flight {in_flight}" if isinstance(in_flight, int) else ""
    return (f"done {stats.sent} · failed {stats.failed}{flight} · tok {stats.prompt_tokens}"
            f"+{stats.completion_tokens} · ${stats.cost_usd:.4f} · {stats.sent / elapsed:.1f}/s")


def lacks_logprobs(job: Job, comp: Completion) -> bool:
    """A good completion without the top-k logprobs its job asked for."""
    return job.params.top_logprobs > 0 and comp.top_logprobs is None and not comp.error


def run_jobs(
    teacher: Teacher,
    jobs: Sequence[Job],
    cache: ResponseCache | None,
    *,
    price_in: float = 0.0,
    price_out: float = 0.0,
    description: str = "generate",
    show_progress: bool = True,
    need_logprobs: bool = False,
) -> tuple[dict[tuple[str, int], Completion], EngineStats]:
    """Complete every (job, sample): from the cache where possible, else from the teacher.

    `need_logprobs`: a cached completion without the `top_logprobs` its job asks for is sent
    again (a run that needs soft targets must not reuse answers of a server that dropped them).
    """
    return asyncio.run(
        arun_jobs(teacher, jobs, cache, price_in=price_in, price_out=price_out,
                  description=description, show_progress=show_progress,
                  need_logprobs=need_logprobs)
    )


async def arun_jobs(
    teacher: Teacher,
    jobs: Sequence[Job],
    cache: ResponseCache | None,
    *,
    price_in: float = 0.0,
    price_out: float = 0.0,
    description: str = "generate",
    show_progress: bool = True,
    need_logprobs: bool = False,
) -> tuple[dict[tuple[str, int], Completion], EngineStats]:
    stats = EngineStats()
    results: dict[tuple[str, int], Completion] = {}
    keys: dict[tuple[str, int], str] = {}
    for job in jobs:
        for s in job.samples:
            keys[(job.key, s)] = cache_key(teacher.backend, teacher.model_id, job.messages,
                                           job.params, s, job.response_format)
    stats.requested = len(keys)
    hits = cache.get_many(list(keys.values())) if cache else {}
    todo: list[Job] = []
    for job in jobs:
        missing = []
        for s in job.samples:
            hit = hits.get(keys[(job.key, s)])
            if hit is not None and not (need_logprobs and lacks_logprobs(job, hit)):
                results[(job.key, s)] = hit
            else:
                missing.append(s)
        if missing:
            todo.append(job.pending(missing))
    stats.cached = len(results)

    progress = make_progress()
    started = time.perf_counter()
    task = progress.add_task(description, total=stats.requested, completed=stats.cached,
                             info=f"cached {stats.cached}")
    if show_progress:
        progress.start()
    shown = 0.0
    try:
        if todo:
            # Closed before the teacher is (the `finally` below): a failure here (a full disk
            # under the cache) first stops the stream's workers, which then exit quietly.
            stream = teacher.stream(todo)
            async with contextlib.AsyncExitStack() as closing:
                if (close := getattr(stream, "aclose", None)) is not None:
                    closing.push_async_callback(close)
                async for job, s, comp in stream:
                    results[(job.key, s)] = comp
                    if cache is not None:
                        cache.put(keys[(job.key, s)], comp)
                    stats.sent += 1
                    stats.failed += bool(comp.error)
                    stats.prompt_tokens += comp.prompt_tokens
                    stats.completion_tokens += comp.completion_tokens
                    stats.cost_usd += completion_cost(comp, price_in, price_out)
                    if comp.error_kind == "budget":
                        stats.budget_stopped = True
                    now = time.perf_counter()
                    if now - shown >= PROGRESS_EVERY_S:  # the bar redraws 10x/s at most
                        shown = now
                        progress.update(task, completed=stats.cached + stats.sent,
                                        info=progress_info(stats, teacher, started))
    finally:
        progress.update(task, completed=stats.cached + stats.sent,
                        info=progress_info(stats, teacher, started))
        if show_progress:
            progress.stop()
        await teacher.aclose()
    return results, stats
