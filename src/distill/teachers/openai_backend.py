"""Any OpenAI-compatible chat endpoint (OpenAI, vLLM/SGLang/TGI servers, gateways) at scale.

Built on the official `openai` SDK's `AsyncOpenAI` with the SDK's own retries off: this module
owns the retry policy, because a generation run needs more than "retry a few times":

- at most `max_concurrency` requests on the wire, with requests- and tokens-per-minute buckets;
- a 429 honours `Retry-After`; a burst of 429s (a storm) pauses every worker, not just one;
- 5xx, timeouts, dropped connections, malformed or empty bodies back off exponentially with
  jitter and fail over to another replica when `base_url` is a list;
- `finish_reason` "length" / "content_filter" follow `on_length` / `on_content_filter`;
- `max_cost_usd` is never crossed: each request reserves its worst case before it is sent;
- every sample ends as a `Completion`: text, or `error` saying why (and `error_kind`, what
  kind of failure). Nothing is raised.

What a server silently ignores (as `transformers serve` does with `n`, `logprobs` and
`top_logprobs`, answering 200 all the same) is noticed where the response shows it: fewer choices
than `n` asked for switch the run to one request per sample (no sample is lost, no attempt is
charged); choices without logprobs when `top_logprobs` is set are counted in `logprobs_missing`
and warned about once, or, with `require_logprobs` (a run whose KD training needs them), stop new
requests after the first responses, so little is spent before the caller reports it. An ignored
`temperature`, `top_p` or `seed` leaves no trace in a response and cannot be detected.

The API key is read from the environment variable `api_key_env` names, handed to the SDK
client and never kept on this object, written to a file or put in an error message.

This module is the scheduling: workers, retries, budget, replicas. One request's body, its
response and what a failure means are `openai_wire`; the HTTP clients are `openai_client`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from distill.config import ConfigError, TeacherConfig
from distill.teachers.base import BatchItem, Completion, ErrorKind, Job, Result, stream_batch
from distill.teachers.estimate import estimate_prompt_tokens
from distill.teachers.limits import (
    Budget,
    BudgetExhausted,
    PauseGate,
    StormDetector,
    TokenBucket,
    backoff_delay,
)
from distill.teachers.openai_client import (
    base_urls,
    direct_client,
    open_replicas,
    probe,
    read_api_key,
    scrub,
    send,
)
from distill.teachers.openai_wire import (
    Adapt,
    Failure,
    Fatal,
    RateLimited,
    Retry,
    billed,
    classify,
    parse_body,
    request_kwargs,
)
from distill.teachers.replicas import Replica, ReplicaPool
from distill.teachers.responses import (
    NO_LOGPROBS,
    Choice,
    estimate_choice_tokens,
    read_choice,
    retry_note,
    served_model,
    split,
)

__all__ = ["NO_LOGPROBS", "OpenAITeacher", "base_urls", "direct_client", "read_api_key"]

log = logging.getLogger(__name__)


@dataclass
class _Unit:
    """One prompt's samples still pending, and what was spent on it so far."""

    job: Job
    samples: list[int]
    attempts: int = 0
    rate_limited: int = 0
    reseed: int = 0
    """Content retries (length, content filter, empty) resample with a shifted seed."""
    carried: dict[int, list[int]] = field(default_factory=dict)
    """Tokens billed for discarded choices, per sample: added to the sample's final counts."""
    last_error: str = "no attempt made"
    last_kind: ErrorKind = "other"
    """The kind of `last_error`: what the samples end as when the retries run out."""
    done: list[tuple[int, Completion]] = field(default_factory=list)
    """Finished samples not yet handed to the stream."""

    def failed(self, kind: ErrorKind, why: str) -> None:
        self.last_error, self.last_kind = why, kind


@dataclass
class _Board:
    """What the workers of one `stream` share: units in progress, and a wake-up call."""

    active: int = 0
    news: asyncio.Event = field(default_factory=asyncio.Event)


class OpenAITeacher:
    backend = "openai"

    def __init__(self, cfg: TeacherConfig, *, backoff_base_s: float = 1.0,
                 backoff_cap_s: float = 60.0, max_retry_after_s: float = 120.0,
                 replica_max_failures: int = 3, replica_cooldown_s: float = 5.0,
                 storm_threshold: int | None = None, storm_window_s: float = 2.0,
                 max_rate_limit_retries: int | None = None,
                 require_logprobs: bool = False) -> None:
        if not cfg.model:
            raise ConfigError("teacher.model: empty; expected the model name the server serves")
        self.cfg = cfg
        self.model_id = cfg.model
        self.urls = base_urls(cfg.base_url)
        read_api_key(cfg, self.urls)  # fail early on a missing key; the value is not kept
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.max_retry_after_s = max_retry_after_s
        self.replica_max_failures = replica_max_failures
        self.replica_cooldown_s = replica_cooldown_s
        self.max_rate_limit_retries = (max_rate_limit_retries if max_rate_limit_retries is not None
                                       else max(10, 3 * cfg.max_retries))
        self.budget = Budget(cfg.max_cost_usd, cfg.price_in_per_mtok, cfg.price_out_per_mtok)
        self.gate = PauseGate()
        self.storm = StormDetector(storm_threshold or max(3, cfg.max_concurrency // 4),
                                   storm_window_s)
        self.counters: dict[str, int] = dict.fromkeys(
            ("requests", "retries", "rate_limited", "storms", "failovers", "timeouts",
             "connection_errors", "server_errors", "malformed", "empty"), 0)
        self.n_supported = True
        """Whether the server returns several choices per request (learned on the first try)."""
        self.require_logprobs = require_logprobs
        """Stop sending once a response comes back without the `top_logprobs` asked for."""
        self.logprobs_missing = 0
        """Completions returned without logprobs although `top_logprobs` asked for them."""
        self.max_tokens_field = "max_tokens"
        self._direct = cfg.http_client != "sdk"
        self._prompt_ratio = 1.0
        self._fatal: tuple[ErrorKind, str] | None = None
        """Why nothing more is sent in this `stream` (a bad key, no quota, no logprobs)."""
        self._pool: ReplicaPool | None = None
        self._sem: asyncio.Semaphore | None = None
        self._rpm: TokenBucket | None = None
        self._tpm: TokenBucket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"OpenAITeacher(model={self.model_id!r}, base_url={self.urls!r})"

    @property
    def in_flight(self) -> int:
        return self._pool.in_flight if self._pool is not None else 0

    @property
    def budget_stopped(self) -> bool:
        return self.budget.closed

    # clients live on the event loop of one `stream` call ----------------------------------------
    def _open(self) -> None:
        cfg = self.cfg
        self._loop = asyncio.get_running_loop()
        self._fatal = None
        self._pool = ReplicaPool(open_replicas(cfg, self.urls),
                                 max_failures=self.replica_max_failures,
                                 cooldown_s=self.replica_cooldown_s, probe=self._probe,
                                 max_wait_s=min(cfg.timeout_s, 30.0))
        self._sem = asyncio.Semaphore(cfg.max_concurrency)
        self._rpm = TokenBucket.per_minute(cfg.requests_per_minute) \
            if cfg.requests_per_minute else None
        self._tpm = TokenBucket.per_minute(cfg.tokens_per_minute) \
            if cfg.tokens_per_minute else None
        self.budget.rebind()

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for r in pool.replicas:
            try:
                await r.client.close()
            except Exception as err:  # noqa: BLE001 - closing must not mask results
                log.debug("closing client for %s: %s", r.url, type(err).__name__)

    async def _probe(self, replica: Replica) -> bool:
        return await probe(replica, direct=self._direct, timeout_s=self.cfg.timeout_s)

    # the protocol ---------------------------------------------------------------------------
    async def stream(self, jobs: Sequence[Job]) -> AsyncIterator[Result]:
        queue: deque[_Unit] = deque(_Unit(job, list(job.samples)) for job in jobs if job.samples)
        if not queue:
            return
        if self._pool is None or self._loop is not asyncio.get_running_loop():
            self._open()
        out: asyncio.Queue[Result | None] = asyncio.Queue()
        # Twice the concurrency in workers: a worker sleeping out a backoff holds no slot.
        # Sized by samples, not prompts: a server without n > 1 turns each sample into a unit.
        n_workers = min(sum(len(u.samples) for u in queue), 2 * self.cfg.max_concurrency)
        board = _Board()
        workers = [asyncio.create_task(self._worker(queue, out, board)) for _ in range(n_workers)]
        finished = 0
        try:
            while finished < n_workers:
                item = await out.get()
                if item is None:
                    finished += 1
                else:
                    yield item
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    def generate_batch(self, batch: Sequence[BatchItem]) -> list[Completion]:
        return stream_batch(self, batch)

    async def _worker(self, queue: deque[_Unit], out: asyncio.Queue[Result | None],
                      board: _Board) -> None:
        try:
            while True:
                if not queue:
                    if board.active == 0:
                        break
                    # Others are still working and may requeue samples: wait for news.
                    board.news.clear()
                    await board.news.wait()
                    continue
                unit = queue.popleft()
                if len(unit.samples) > 1 and not self.n_supported:
                    for s in reversed(unit.samples):
                        queue.appendleft(_Unit(unit.job, [s], unit.attempts, unit.rate_limited,
                                               unit.reseed, {s: unit.carried.get(s, [0, 0])}))
                    board.news.set()
                    continue
                board.active += 1
                try:
                    await self._complete(unit)
                except Exception as err:  # noqa: BLE001 - a bug must not lose rows
                    log.exception("openai teacher: unexpected error")
                    self._fail(unit, "internal", f"internal error: {err!r}")
                finally:
                    board.active -= 1
                    for s, comp in unit.done:
                        out.put_nowait((unit.job, s, comp))
                    unit.done = []
                    if unit.samples:  # the server will not do n > 1: split and requeue
                        queue.appendleft(unit)
                    board.news.set()
        finally:
            out.put_nowait(None)

    # one prompt, until every sample is done or given up on ------------------------------------
    async def _complete(self, unit: _Unit) -> None:
        """Work on `unit` until its samples are all in `unit.done`, or it must be split."""
        cfg = self.cfg
        avoid: Replica | None = None
        while unit.samples:
            if self._fatal:
                return self._fail(unit, self._fatal[0], f"not sent: {self._fatal[1]}")
            if unit.attempts > cfg.max_retries:
                return self._fail(unit, unit.last_kind,
                                  f"{unit.last_error} (gave up after {unit.attempts} attempts)")
            if unit.rate_limited > self.max_rate_limit_retries:
                return self._fail(unit, "rate_limit", f"{unit.last_error} "
                                  f"(gave up after {unit.rate_limited} rate limits)")
            if len(unit.samples) > 1 and not self.n_supported:
                return
            batch = list(unit.samples)
            est_prompt = int(estimate_prompt_tokens(unit.job.messages) * self._prompt_ratio)
            est_out = unit.job.params.max_tokens * len(batch)
            try:
                reserved = await self.budget.reserve(est_prompt, est_out)
            except BudgetExhausted:
                return self._fail(unit, "budget", self.budget.message())
            if self._tpm is not None:
                await self._tpm.acquire(est_prompt + est_out)
            if self._rpm is not None:
                await self._rpm.acquire()
            await self.gate.wait()
            usage = (0, 0)
            try:
                body, latency = await self._send(unit, batch, avoid)
                avoid = None
                prompt, completion, self._prompt_ratio = billed(body, unit.job,
                                                                self._prompt_ratio)
                usage = (prompt, completion)
                self._accept(unit, batch, body, latency, usage)
            except Adapt:
                pass
            except RateLimited as err:
                unit.rate_limited += 1
                unit.failed("rate_limit", err.why)
                await self._after_rate_limit(unit, err)
            except Retry as err:
                unit.attempts += 1
                unit.failed(err.kind, err.why)
                self.counters["retries"] += 1
                if err.replica is not None and self._pool is not None \
                        and len(self._pool.healthy()) > 1:
                    avoid = err.replica
                    self.counters["failovers"] += 1
                else:
                    delay = backoff_delay(unit.attempts - 1, base=self.backoff_base_s,
                                          cap=self.backoff_cap_s)
                    if err.retry_after is not None:
                        delay = max(delay, min(err.retry_after, self.max_retry_after_s))
                    await asyncio.sleep(delay)
            except Fatal as err:
                if err.global_:
                    self._fatal = (err.kind, err.why)
                    log.error("openai teacher: %s; stopping new requests", err.why)
                return self._fail(unit, err.kind, err.why)
            finally:
                await self.budget.settle(reserved, *usage)
                if self._tpm is not None:
                    self._tpm.refund(max(0, est_prompt + est_out - sum(usage)))

    def _fail(self, unit: _Unit, kind: ErrorKind, why: str) -> None:
        """Error rows for every pending sample, carrying the tokens their attempts were billed."""
        why = scrub(self.cfg, why)
        for s in unit.samples:
            billed_tokens = unit.carried.get(s, [0, 0])
            unit.done.append((s, Completion.failed(kind, why, prompt_tokens=billed_tokens[0],
                                                   completion_tokens=billed_tokens[1])))
        unit.samples = []

    async def _after_rate_limit(self, unit: _Unit, err: RateLimited) -> None:
        self.counters["rate_limited"] += 1
        delay = err.retry_after
        if delay is None:
            delay = backoff_delay(unit.rate_limited - 1, base=self.backoff_base_s,
                                  cap=self.backoff_cap_s)
        delay = min(delay, self.max_retry_after_s)
        if self.storm.hit():
            # Limits are per account: when many workers hit them at once, all of them wait.
            self.counters["storms"] += 1
            log.warning("openai teacher: rate-limit storm; pausing all requests for %.1fs", delay)
            self.gate.pause_for(delay)
        await asyncio.sleep(delay)

    # one HTTP request -----------------------------------------------------------------------
    async def _send(self, unit: _Unit, batch: list[int],
                    avoid: Replica | None) -> tuple[dict[str, Any], float]:
        assert self._pool is not None and self._sem is not None
        async with self._sem:
            # Checked again with a slot in hand: a storm or a fatal error may have begun while
            # this worker queued for it.
            await self.gate.wait()
            if self._fatal:
                raise Fatal(self._fatal[0], f"not sent: {self._fatal[1]}")
            if len(batch) > 1 and not self.n_supported:
                raise Adapt  # learned while queued: go back and split
            replica = await self._pool.acquire(avoid)
            kwargs = request_kwargs(self.cfg.model, unit.job, batch, reseed=unit.reseed,
                                    max_tokens_field=self.max_tokens_field,
                                    extra_body=self.cfg.extra_body)
            self.counters["requests"] += 1
            t0 = time.perf_counter()
            try:
                content = await send(replica, kwargs, direct=self._direct)
            except Exception as err:  # noqa: BLE001 - classified
                raise self._verdict(replica, classify(
                    err, kwargs, timeout_s=self.cfg.timeout_s, solo=len(self._pool) == 1)
                ) from None
            finally:
                self._pool.release(replica)
        latency = time.perf_counter() - t0
        try:
            body = parse_body(content)
        except Retry as err:
            raise self._verdict(replica, err) from None
        self._pool.success(replica)
        return body, latency

    def _verdict(self, replica: Replica, failure: Failure) -> Failure:
        """Apply what a failed request on `replica` teaches (replica health, counters, the
        request shape); returns `failure` for the caller to raise."""
        assert self._pool is not None
        if isinstance(failure, Retry):
            if failure.counter:
                self.counters[failure.counter] += 1
            self._pool.failure(replica, failure.label)
            failure.replica = replica
        elif isinstance(failure, RateLimited):
            self._pool.success(replica)  # the replica is fine, the account is busy
        elif isinstance(failure, Adapt) and failure.change == "no_n":
            if self.n_supported:
                log.warning("openai teacher: server rejects n > 1; one request per sample")
            self.n_supported = False
        elif isinstance(failure, Adapt) and failure.change == "max_completion_tokens":
            self.max_tokens_field = "max_completion_tokens"
        return failure

    # turning a body into completions ---------------------------------------------------------
    def _accept(self, unit: _Unit, batch: list[int], body: dict[str, Any], latency: float,
                usage: tuple[int, int]) -> None:
        cfg = self.cfg
        choices = [c for c in body["choices"] if isinstance(c, dict)]
        choices.sort(key=lambda c: c["index"] if isinstance(c.get("index"), int) else 0)
        choices = choices[: len(batch)]
        estimated = not isinstance(body.get("usage"), dict)
        prompt_split = split(usage[0], [1] * len(choices))
        completion_split = split(usage[1], [estimate_choice_tokens(c) for c in choices])
        done: list[tuple[int, Completion]] = []
        retry: Choice | None = None
        served = served_model(body)
        for sample, choice, p_tok, c_tok in zip(batch, choices, prompt_split, completion_split,
                                                strict=False):
            read = read_choice(cfg, unit.job, choice)
            carried = unit.carried.setdefault(sample, [0, 0])
            carried[0] += p_tok
            carried[1] += c_tok
            if read.kind == "empty":
                self.counters["empty"] += 1
            if read.policy == "retry":
                retry = read
                continue
            comp = Completion(text=read.text, reasoning=read.reasoning,
                              finish_reason=read.finish_reason, prompt_tokens=carried[0],
                              completion_tokens=carried[1], latency_s=latency)
            if read.policy == "drop":
                comp.fail("dropped", read.error)
            if unit.job.params.top_logprobs > 0:
                comp.top_logprobs = read.top_logprobs
                if comp.top_logprobs is None:
                    self._no_logprobs()
            extra: dict[str, Any] = {}
            if unit.attempts:
                extra["attempts"] = unit.attempts + 1
            if estimated:
                extra["usage_estimated"] = True
            if served:
                extra["served_model"] = served
            if read.parsed is not None:
                extra["parsed"] = read.parsed
            comp.extra = extra
            done.append((sample, comp))
        finished = {s for s, _ in done}
        unit.samples = [s for s in unit.samples if s not in finished]
        if unit.samples and retry is not None:
            unit.attempts += 1
            unit.reseed += 1
            unit.failed(retry.kind or "other", retry_note(retry))
        elif unit.samples:
            # Fewer usable choices than asked. When each one became a sample that is progress,
            # not a failed attempt (so a server that ignores n loses no sample, whatever
            # max_retries); only a response that finished nothing counts as an attempt. One
            # choice for n > 1 is a server that ignores n: one request per sample from now on.
            if not done:
                unit.attempts += 1
            unit.failed("empty", f"server returned {len(choices)} of {len(batch)} choices")
            if len(batch) > 1 and len(choices) == 1:
                self._n_ignored()
        unit.done += done

    def _n_ignored(self) -> None:
        if self.n_supported:
            log.warning("openai teacher: server ignores n (one choice for n > 1); "
                        "one request per sample")
        self.n_supported = False

    def _no_logprobs(self) -> None:
        """A completion came back without the logprobs asked for: warn once, or stop sending."""
        self.logprobs_missing += 1
        if self.require_logprobs and self._fatal is None:
            # per `stream`: a later call on this teacher stops too
            self._fatal = ("missing_logprobs", NO_LOGPROBS)
            log.error("openai teacher: %s; stopping new requests", NO_LOGPROBS)
        elif not self.require_logprobs and self.logprobs_missing == 1:
            log.warning("openai teacher: %s", NO_LOGPROBS)
