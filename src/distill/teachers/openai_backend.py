"""Any OpenAI-compatible chat endpoint (OpenAI, vLLM/SGLang/TGI servers, gateways) at scale.

Built on the official `openai` SDK's `AsyncOpenAI` with the SDK's own retries off: this module
owns the retry policy, because a generation run needs more than "retry a few times":

- at most `max_concurrency` requests on the wire, with requests- and tokens-per-minute buckets;
- a 429 honours `Retry-After`; a burst of 429s (a storm) pauses every worker, not just one;
- 5xx, timeouts, dropped connections, malformed or empty bodies back off exponentially with
  jitter and fail over to another replica when `base_url` is a list;
- `finish_reason` "length" / "content_filter" follow `on_length` / `on_content_filter`;
- `max_cost_usd` is never crossed: each request reserves its worst case before it is sent;
- every sample ends as a `Completion`: text, or `error` saying why. Nothing is raised.

What a server silently ignores (as `transformers serve` does with `n`, `logprobs` and
`top_logprobs`, answering 200 all the same) is noticed where the response shows it: fewer choices
than `n` asked for switch the run to one request per sample (no sample is lost, no attempt is
charged); choices without logprobs when `top_logprobs` is set are counted in `logprobs_missing`
and warned about once, or, with `require_logprobs` (a run whose KD training needs them), stop new
requests after the first responses, so little is spent before the caller reports it. An ignored
`temperature`, `top_p` or `seed` leaves no trace in a response and cannot be detected.

The API key is read from the environment variable `api_key_env` names, handed to the SDK
client and never kept on this object, written to a file or put in an error message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import urlparse

import orjson

from distill.config import ConfigError, TeacherConfig
from distill.teachers.base import Completion, Job
from distill.teachers.estimate import estimate_prompt_tokens
from distill.teachers.limits import (
    Budget,
    BudgetExhausted,
    PauseGate,
    StormDetector,
    TokenBucket,
    backoff_delay,
    parse_retry_after,
)
from distill.teachers.replicas import Replica, ReplicaPool
from distill.teachers.responses import (
    estimate_choice_tokens,
    read_choice,
    retry_note,
    served_model,
    split,
)

log = logging.getLogger(__name__)

NO_LOGPROBS = ("teacher.top_logprobs: the server returned no logprobs (it ignores `logprobs` / "
               "`top_logprobs`), so these completions carry no soft targets")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
LOCAL_DUMMY_KEY = "EMPTY"
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "host.docker.internal"}
_RETRYABLE_STATUS = {408, 409, 425}


def base_urls(base_url: str | list[str] | None) -> list[str]:
    urls = [base_url] if isinstance(base_url, str) else list(base_url or [])
    urls = [u.rstrip("/") for u in urls if u and u.strip()]
    return urls or [DEFAULT_BASE_URL]


def is_local(url: str) -> bool:
    host = (urlparse(url).hostname or "").lower()
    return host in _LOCAL_HOSTS or host.startswith("127.") or host.endswith(".localhost")


def read_api_key(cfg: TeacherConfig, urls: list[str]) -> str:
    """The key from the environment, a dummy for local servers, or a ConfigError naming the var."""
    name = cfg.api_key_env
    key = os.environ.get(name) if name else None
    if key:
        return key
    if name is None or all(is_local(u) for u in urls):
        return LOCAL_DUMMY_KEY
    raise ConfigError(f"teacher.api_key_env: environment variable {name} is not set "
                      f"(needed for {urlparse(urls[0]).hostname})")


def direct_client(name: str) -> Any:
    """The bare HTTP client class `teacher.http_client` names (`direct`: the default one)."""
    if name == "httpx":
        from distill.teachers.direct_http import DirectClient

        return DirectClient
    from distill.teachers.direct_aiohttp import AiohttpClient

    return AiohttpClient


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
    done: list[tuple[int, Completion]] = field(default_factory=list)
    """Finished samples not yet handed to the stream."""


@dataclass
class _Board:
    """What the workers of one `stream` share: units in progress, and a wake-up call."""

    active: int = 0
    news: asyncio.Event = field(default_factory=asyncio.Event)


class _Retry(Exception):
    """A transport or server failure worth another attempt."""

    def __init__(self, why: str, *, retry_after: float | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.retry_after = retry_after


class _RateLimited(Exception):
    def __init__(self, why: str, retry_after: float | None) -> None:
        super().__init__(why)
        self.why = why
        self.retry_after = retry_after


class _Fatal(Exception):
    """A failure retrying cannot fix (bad request). `global_` ones stop the whole run."""

    def __init__(self, why: str, *, global_: bool = False) -> None:
        super().__init__(why)
        self.why = why
        self.global_ = global_


class _Adapt(Exception):
    """The server rejected a request shape we can change (n > 1, max_tokens): resend."""


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
        self.model = cfg.model
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
        self._fatal: str | None = None
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
        import httpx2
        from openai import AsyncOpenAI, DefaultAsyncHttpxClient

        cfg = self.cfg
        self._loop = asyncio.get_running_loop()
        self._fatal = None
        key = read_api_key(cfg, self.urls)
        timeout = httpx2.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 10.0))
        limits = httpx2.Limits(max_connections=cfg.max_concurrency * 2 + 8,
                               max_keepalive_connections=cfg.max_concurrency + 8)
        if self._direct:
            client_cls = direct_client(cfg.http_client)
            replicas = [Replica(url=url, client=client_cls(url, key, timeout=timeout,
                                                           limits=limits))
                        for url in self.urls]
        else:
            replicas = [
                Replica(url=url, client=AsyncOpenAI(
                    base_url=url, api_key=key, max_retries=0, timeout=timeout,
                    http_client=DefaultAsyncHttpxClient(timeout=timeout, limits=limits)))
                for url in self.urls
            ]
        del key
        self._pool = ReplicaPool(replicas, max_failures=self.replica_max_failures,
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
        if self._direct:
            await replica.client.probe(min(5.0, self.cfg.timeout_s))
        else:
            await replica.client.models.list(timeout=min(5.0, self.cfg.timeout_s))
        return True

    # the protocol ---------------------------------------------------------------------------
    async def stream(self, jobs: Sequence[Job]) -> AsyncIterator[tuple[Job, int, Completion]]:
        queue: deque[_Unit] = deque(_Unit(job, list(job.samples)) for job in jobs if job.samples)
        if not queue:
            return
        if self._pool is None or self._loop is not asyncio.get_running_loop():
            self._open()
        out: asyncio.Queue[tuple[Job, int, Completion] | None] = asyncio.Queue()
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

    async def _worker(self, queue: deque[_Unit],
                      out: asyncio.Queue[tuple[Job, int, Completion] | None],
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
                    self._fail(unit, f"internal error: {err!r}")
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
                return self._fail(unit, f"not sent: {self._fatal}")
            if unit.attempts > cfg.max_retries:
                return self._fail(
                    unit, f"{unit.last_error} (gave up after {unit.attempts} attempts)")
            if unit.rate_limited > self.max_rate_limit_retries:
                return self._fail(
                    unit, f"{unit.last_error} (gave up after {unit.rate_limited} rate limits)")
            if len(unit.samples) > 1 and not self.n_supported:
                return
            batch = list(unit.samples)
            est_prompt = int(estimate_prompt_tokens(unit.job.messages) * self._prompt_ratio)
            est_out = unit.job.params.max_tokens * len(batch)
            try:
                reserved = await self.budget.reserve(est_prompt, est_out)
            except BudgetExhausted:
                return self._fail(unit, self.budget.message())
            if self._tpm is not None:
                await self._tpm.acquire(est_prompt + est_out)
            if self._rpm is not None:
                await self._rpm.acquire()
            await self.gate.wait()
            usage = (0, 0)
            try:
                body, latency = await self._send(unit, batch, avoid)
                avoid = None
                usage = self._billed(body, unit, batch)
                self._accept(unit, batch, body, latency, usage)
            except _Adapt:
                pass
            except _RateLimited as err:
                unit.rate_limited += 1
                unit.last_error = err.why
                await self._after_rate_limit(unit, err)
            except _Retry as err:
                unit.attempts += 1
                unit.last_error = err.why
                self.counters["retries"] += 1
                if isinstance(err.__cause__, _FailedOn) and self._pool is not None \
                        and len(self._pool.healthy()) > 1:
                    avoid = err.__cause__.replica
                    self.counters["failovers"] += 1
                else:
                    delay = backoff_delay(unit.attempts - 1, base=self.backoff_base_s,
                                          cap=self.backoff_cap_s)
                    if err.retry_after is not None:
                        delay = max(delay, min(err.retry_after, self.max_retry_after_s))
                    await asyncio.sleep(delay)
            except _Fatal as err:
                if err.global_:
                    self._fatal = err.why
                    log.error("openai teacher: %s; stopping new requests", err.why)
                return self._fail(unit, err.why)
            finally:
                await self.budget.settle(reserved, *usage)
                if self._tpm is not None:
                    self._tpm.refund(max(0, est_prompt + est_out - sum(usage)))

    def _fail(self, unit: _Unit, why: str) -> None:
        """Error rows for every pending sample, carrying the tokens their attempts were billed."""
        why = self._scrub(why)
        for s in unit.samples:
            billed = unit.carried.get(s, [0, 0])
            unit.done.append((s, Completion(error=why, prompt_tokens=billed[0],
                                            completion_tokens=billed[1])))
        unit.samples = []

    async def _after_rate_limit(self, unit: _Unit, err: _RateLimited) -> None:
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
                raise _Fatal(f"not sent: {self._fatal}")
            if len(batch) > 1 and not self.n_supported:
                raise _Adapt  # learned while queued: go back and split
            replica = await self._pool.acquire(avoid)
            kwargs = self._request(unit, batch)
            self.counters["requests"] += 1
            t0 = time.perf_counter()
            try:
                if self._direct:
                    content = await replica.client.chat(kwargs)
                else:
                    raw = await replica.client.chat.completions.with_raw_response.create(
                        **kwargs)
                    content = raw.content
            except Exception as err:  # noqa: BLE001 - classified below
                self._classify(err, replica, kwargs)
            finally:
                self._pool.release(replica)
        latency = time.perf_counter() - t0
        return self._parse(replica, content), latency

    def _request(self, unit: _Unit, batch: list[int]) -> dict[str, Any]:
        params = unit.job.params
        kwargs: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": unit.job.messages,
            "temperature": params.temperature,
            "top_p": params.top_p,
            self.max_tokens_field: params.max_tokens,
            # Distinct seeds per sample: one-sample requests must not all return the same text.
            "seed": params.seed + batch[0] + 7919 * unit.reseed,
        }
        if len(batch) > 1:
            kwargs["n"] = len(batch)
        if params.top_logprobs > 0:
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = params.top_logprobs
        if unit.job.response_format is not None:
            kwargs["response_format"] = unit.job.response_format
        if self.cfg.extra_body:
            kwargs["extra_body"] = self.cfg.extra_body
        return kwargs

    def _parse(self, replica: Replica, content: bytes) -> dict[str, Any]:
        assert self._pool is not None
        try:
            body = orjson.loads(content)
        except ValueError:
            self.counters["malformed"] += 1
            self._pool.failure(replica, "malformed JSON")
            raise _Retry(f"malformed response: not JSON ({content[:80]!r})") \
                from _FailedOn(replica)
        if not isinstance(body, dict):
            self.counters["malformed"] += 1
            self._pool.failure(replica, "malformed JSON")
            raise _Retry("malformed response: not a JSON object") from _FailedOn(replica)
        if "error" in body and not body.get("choices"):
            self._pool.failure(replica, "error body")
            raise _Retry(f"server error: {_error_text(body)}") from _FailedOn(replica)
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices:
            self.counters["empty"] += 1
            self._pool.failure(replica, "no choices")
            raise _Retry("empty response: no choices") from _FailedOn(replica)
        self._pool.success(replica)
        return body

    def _classify(self, err: Exception, replica: Replica, kwargs: dict[str, Any]) -> NoReturn:
        """Turn an SDK exception into _Retry / _RateLimited / _Fatal / _Adapt (always raises)."""
        import openai

        assert self._pool is not None
        pool, solo = self._pool, len(self._pool) == 1
        if isinstance(err, openai.APITimeoutError):
            self.counters["timeouts"] += 1
            pool.failure(replica, "timeout")
            raise _Retry(f"timeout after {self.cfg.timeout_s:g}s") from _FailedOn(replica)
        if isinstance(err, openai.APIConnectionError):
            self.counters["connection_errors"] += 1
            pool.failure(replica, "connection error")
            cause = err.__cause__
            detail = f" ({type(cause).__name__})" if cause is not None else ""
            raise _Retry(f"connection error{detail}") from _FailedOn(replica)
        if not isinstance(err, openai.APIStatusError):
            pool.failure(replica, type(err).__name__)
            raise _Retry(f"{type(err).__name__}: {err}") from _FailedOn(replica)
        status, text = err.status_code, _error_text(err.body) or str(err.message)
        why = f"HTTP {status}: {text}"[:300]
        if status == 429:
            if (err.code or "") == "insufficient_quota" or "quota" in (err.type or ""):
                raise _Fatal(why, global_=True)
            pool.success(replica)  # the replica is fine, the account is busy
            raise _RateLimited(why, parse_retry_after(err.response.headers))
        if status >= 500 or status in _RETRYABLE_STATUS:
            self.counters["server_errors"] += 1
            pool.failure(replica, f"HTTP {status}")
            # An overloaded server may say when to come back (503 + Retry-After).
            raise _Retry(why, retry_after=parse_retry_after(err.response.headers)) \
                from _FailedOn(replica)
        if status == 400 and kwargs.get("n", 1) > 1 and _about_n(err, text):
            # Requests already in flight with n > 1 land here too: each just resends.
            if self.n_supported:
                log.warning("openai teacher: server rejects n > 1; one request per sample")
            self.n_supported = False
            raise _Adapt
        if status == 400 and "max_tokens" in kwargs and "max_completion_tokens" in text:
            self.max_tokens_field = "max_completion_tokens"
            raise _Adapt
        if status in (401, 403, 404) and not solo:
            pool.failure(replica, f"HTTP {status}")
            raise _Retry(why) from _FailedOn(replica)
        raise _Fatal(why, global_=status in (401, 404))

    # turning a body into completions ---------------------------------------------------------
    def _billed(self, body: dict[str, Any], unit: _Unit, batch: list[int]) -> tuple[int, int]:
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else None
        est_prompt = estimate_prompt_tokens(unit.job.messages)
        if usage and isinstance(usage.get("prompt_tokens"), int):
            prompt = int(usage["prompt_tokens"])
            if est_prompt > 0:  # learn how far off the chars/4 guess is for this model
                self._prompt_ratio = max(1.0, 0.9 * self._prompt_ratio + 0.1 * prompt / est_prompt)
        else:
            prompt = est_prompt
        if usage and isinstance(usage.get("completion_tokens"), int):
            completion = int(usage["completion_tokens"])
        else:
            completion = sum(estimate_choice_tokens(c) for c in body.get("choices") or [])
        return prompt, completion

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
        retry_reason: str | None = None
        served = served_model(body)
        for sample, choice, p_tok, c_tok in zip(batch, choices, prompt_split, completion_split,
                                                strict=False):
            read = read_choice(cfg, unit.job, choice)
            carried = unit.carried.setdefault(sample, [0, 0])
            carried[0] += p_tok
            carried[1] += c_tok
            if read.why == "empty content":
                self.counters["empty"] += 1
            if read.policy == "retry":
                retry_reason = read.why
                continue
            comp = Completion(text=read.text, reasoning=read.reasoning,
                              finish_reason=read.finish_reason, prompt_tokens=carried[0],
                              completion_tokens=carried[1], latency_s=latency)
            if read.policy == "drop":
                comp.error = f"dropped: finish_reason={read.why}"
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
        if unit.samples and retry_reason:
            unit.attempts += 1
            unit.reseed += 1
            unit.last_error = retry_note(retry_reason)
        elif unit.samples:
            # Fewer usable choices than asked. When each one became a sample that is progress,
            # not a failed attempt (so a server that ignores n loses no sample, whatever
            # max_retries); only a response that finished nothing counts as an attempt. One
            # choice for n > 1 is a server that ignores n: one request per sample from now on.
            if not done:
                unit.attempts += 1
            unit.last_error = f"server returned {len(choices)} of {len(batch)} choices"
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
            self._fatal = NO_LOGPROBS  # per `stream`: a later call on this teacher stops too
            log.error("openai teacher: %s; stopping new requests", NO_LOGPROBS)
        elif not self.require_logprobs and self.logprobs_missing == 1:
            log.warning("openai teacher: %s", NO_LOGPROBS)

    def _scrub(self, text: str) -> str:
        """Error text never carries the key, even when a server echoes it back."""
        name = self.cfg.api_key_env
        key = os.environ.get(name) if name else None
        if key and len(key) >= 6:
            text = text.replace(key, "***")
        return text


class _FailedOn(Exception):
    """Chained under a _Retry: which replica failed, so the retry can go elsewhere."""

    def __init__(self, replica: Replica) -> None:
        super().__init__(replica.url)
        self.replica = replica


def _error_text(body: Any) -> str:
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return str(inner.get("message") or inner)[:240]
        return str(inner)[:240]
    return str(body)[:240] if body else ""


def _about_n(err: Any, text: str) -> bool:
    if getattr(err, "param", None) == "n":
        return True
    return bool(re.search(r"(^|[^\w])['\"`]?n['\"`]?\s*(>|must|should|=|is|not|only)", text))
