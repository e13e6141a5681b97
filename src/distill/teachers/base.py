"""The one small protocol every teacher backend speaks.

A backend turns `Job`s (one prompt, some sample indices) into `Completion`s, streaming results as
they arrive so the engine can put each one in the cache the moment it exists. Caching, rate limits
and the progress bar live outside the backends (`engine.py`, `cache.py`, `limits.py`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


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
    top_logprobs: list[list[tuple[int | str, float]]] | None = None
    """Per generated token: the top-k (token id or string, logprob) pairs, for KD."""
    token_ids: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Completion:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if known.get("top_logprobs") is not None:
            known["top_logprobs"] = [[tuple(p) for p in tok] for tok in known["top_logprobs"]]
        return cls(**known)


class Teacher(Protocol):
    backend: str
    model: str

    def stream(self, jobs: Sequence[Job]) -> AsyncIterator[tuple[Job, int, Completion]]:
        """Yield (job, sample index, completion) for every sample of every job, in any order.

        Failures are yielded as completions with `error` set, never raised, so every seed ends
        as a row.
        """
        ...

    async def aclose(self) -> None: ...


def cost_usd(prompt_tokens: int, completion_tokens: int, price_in: float,
             price_out: float) -> float:
    return (prompt_tokens * price_in + completion_tokens * price_out) / 1e6


def completion_cost(comp: Completion, price_in: float, price_out: float) -> float:
    """What `comp` cost at the online prices, times the discount it was served at (a Batch API
    completion carries `extra["price_factor"]`, e.g. 0.5)."""
    factor = comp.extra.get("price_factor", 1.0) if comp.extra else 1.0
    return cost_usd(comp.prompt_tokens, comp.completion_tokens, price_in, price_out) * factor
