"""The one small protocol every teacher backend speaks.

A backend turns `Job`s (one prompt, some sample indices) into `Completion`s, streaming results as
they arrive so the engine can put each one in the cache the moment it exists. Caching, rate limits
and the progress bar live outside the backends (`engine.py`, `cache.py`, `limits.py`).

A failed sample is a `Completion` with `error` (the text a person reads) and `error_kind` (what
code branches on: `ErrorKind`), never an exception, so every seed ends as a row.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, get_args

ErrorKind = Literal[
    "budget",            # max_cost_usd reached: the request was never sent
    "rate_limit",        # still rate limited (429) when the rate-limit retries ran out
    "quota",             # the account is out of quota: the run sends nothing more
    "auth",              # 401 / 403: the key was refused
    "not_found",         # 404: no such model or endpoint
    "bad_request",       # another 4xx: the same request would fail again
    "timeout",           # no answer within timeout_s
    "connection",        # refused, reset or dropped connections, other transport failures
    "server",            # 5xx or an error body
    "malformed",         # a body that is not a chat.completion
    "empty",             # no choices, empty content, or fewer choices than asked for
    "length",            # finish_reason "length" (on_length: retry) until retries ran out
    "content_filter",    # finish_reason "content_filter" (retry) until retries ran out
    "invalid_output",    # a structured response that is not valid JSON or breaks its schema
    "dropped",           # delivered and billed, dropped by on_length / on_content_filter
    "missing_logprobs",  # the server returns no logprobs and training needs them: not sent
    "batch",             # a Batch API batch or line failed
    "backend",           # a local backend (transformers, vLLM) failed
    "internal",          # a bug in distill
    "other",             # anything else (and cached errors from before kinds existed)
]
ERROR_KINDS: tuple[ErrorKind, ...] = get_args(ErrorKind)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int = 0
    top_logprobs: int = 0

    def as_dict(self) -> dict[str, Any]:
        # Every field is a scalar: a flat copy is asdict() without its recursive deep copy
        # (this runs once per sample, for the cache key).
        return dict(self.__dict__)


@dataclass
class Job:
    """One prompt and the sample indices still wanted for it."""

    key: str
    """Caller's id for the prompt (e.g. the seed id)."""
    messages: list[dict[str, str]]
    params: SamplingParams
    samples: list[int]
    response_format: dict[str, Any] | None = None
    """OpenAI `response_format` (json_schema) the response must follow (`teachers.structured`);
    part of the cache key when set."""

    def pending(self, samples: list[int]) -> Job:
        """This prompt with only `samples` still wanted."""
        return Job(key=self.key, messages=self.messages, params=self.params, samples=samples,
                   response_format=self.response_format)


TopLogprobs = list[list[tuple[int | str, float]]]
"""Per generated token: the top-k (token id or string, logprob) pairs, for KD."""


@dataclass
class Completion:
    text: str = ""
    reasoning: str | None = None
    """Separate reasoning trace when the server returns one (`reasoning_content`)."""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    error: str | None = None
    """Why the sample failed, for people (rows and logs carry it verbatim)."""
    top_logprobs: TopLogprobs | None = None
    token_ids: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error_kind: ErrorKind | None = None
    """What kind of failure `error` is, for code: set whenever `error` is."""

    @classmethod
    def failed(cls, kind: ErrorKind, error: str, **fields: Any) -> Completion:
        """A failed sample: `error` says why, `kind` what kind of failure it is."""
        return cls(error=error, error_kind=kind, **fields)

    def fail(self, kind: ErrorKind, error: str) -> None:
        """Mark a delivered completion as failed (e.g. dropped by a finish_reason policy)."""
        self.error, self.error_kind = error, kind

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Completion:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if known.get("top_logprobs") is not None:
            known["top_logprobs"] = [[tuple(p) for p in tok] for tok in known["top_logprobs"]]
        if known.get("error") and known.get("error_kind") not in ERROR_KINDS:
            # Cached before errors had kinds: the cache only ever kept policy drops.
            dropped = str(known["error"]).startswith("dropped:")
            known["error_kind"] = "dropped" if dropped else "other"
        return cls(**known)


Result = tuple[Job, int, Completion]
"""One sample's outcome: its job, its sample index, its completion."""

BatchItem = tuple[Job, int]
"""One sample to generate: a job and one of its sample indices."""


class Teacher(Protocol):
    """What the engine, the generate stage, the judge and evaluate need of a backend."""

    @property
    def backend(self) -> str:
        """The `teacher.backend` name; part of every cache key."""
        ...

    @property
    def model_id(self) -> str:
        """The model as named in the config; part of every cache key."""
        ...

    def stream(self, jobs: Sequence[Job]) -> AsyncIterator[Result]:
        """Yield (job, sample index, completion) for every sample of every job, in any order.

        Failures are yielded as completions with `error` set, never raised, so every seed ends
        as a row.
        """
        ...

    def generate_batch(self, batch: Sequence[BatchItem]) -> list[Completion]:
        """Complete `batch` synchronously (not from inside a running event loop); one
        completion per item, in order. Sample failures are error completions as in `stream`; a
        local backend that cannot run at all raises."""
        ...

    async def aclose(self) -> None:
        """Release what one run opened (clients, worker processes); the teacher stays usable."""
        ...


def jobs_of(batch: Sequence[BatchItem]) -> list[Job]:
    """`batch` as jobs: one per prompt key, its samples in order (as `stream` gets a job)."""
    jobs: dict[str, Job] = {}
    for job, s in batch:
        if job.key in jobs:
            jobs[job.key].samples.append(s)
        else:
            jobs[job.key] = job.pending([s])
    for job in jobs.values():
        job.samples.sort()
    return list(jobs.values())


def stream_batch(teacher: Teacher, batch: Sequence[BatchItem]) -> list[Completion]:
    """`generate_batch` of a backend that streams: one event loop runs `batch` through
    `teacher.stream` and closes what it opened; completions come back in `batch` order."""

    async def run() -> dict[tuple[str, int], Completion]:
        try:
            return {(job.key, s): comp async for job, s, comp in teacher.stream(jobs_of(batch))}
        finally:
            await teacher.aclose()

    done = asyncio.run(run())
    return [done[(job.key, s)] for job, s in batch]


def cost_usd(prompt_tokens: int, completion_tokens: int, price_in: float,
             price_out: float) -> float:
    return (prompt_tokens * price_in + completion_tokens * price_out) / 1e6


def completion_cost(comp: Completion, price_in: float, price_out: float) -> float:
    """What `comp` cost at the online prices, times the discount it was served at (a Batch API
    completion carries `extra["price_factor"]`, e.g. 0.5)."""
    factor = comp.extra.get("price_factor", 1.0) if comp.extra else 1.0
    return cost_usd(comp.prompt_tokens, comp.completion_tokens, price_in, price_out) * factor
