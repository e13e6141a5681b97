"""The OpenAI-compatible teacher against a real loopback server and the real `openai` client.

Every fault a production endpoint throws is scripted on the fake server; each test asserts what
a user would check: every sample ends as a row, with text or an error saying why, and the
server saw exactly the requests it should have.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakeserver_fixture  # noqa: E402
from fakeserver import (  # noqa: E402
    FakeServer,
    Reply,
    Request,
    chat_body,
    error_body,
    first_n,
    ok,
    per_prompt,
)

from distill.answers import split_think  # noqa: E402
from distill.config import ConfigError, PipelineConfig, TeacherConfig  # noqa: E402
from distill.teachers import make_teacher  # noqa: E402
from distill.teachers.base import Completion, Job, SamplingParams  # noqa: E402
from distill.teachers.cache import ResponseCache  # noqa: E402
from distill.teachers.engine import EngineStats, run_jobs  # noqa: E402
from distill.teachers.estimate import estimate  # noqa: E402
from distill.teachers.limits import Budget, TokenBucket, parse_retry_after  # noqa: E402
from distill.teachers.openai_backend import OpenAITeacher  # noqa: E402
from distill.teachers.reasoning import normalize_message  # noqa: E402
from distill.teachers.replicas import Replica, ReplicaPool  # noqa: E402
from tests.projects import write_sum_project

fake_server = fakeserver_fixture.fake_server
fake_servers = fakeserver_fixture.fake_servers

pytestmark = pytest.mark.timeout(60)

KEY_ENV = "DISTILL_TEST_OPENAI_KEY"
HTTP_CLIENT = os.environ.get("DISTILL_TEST_HTTP_CLIENT", "direct")
"""The client every test runs on (`teacher.http_client`): `DISTILL_TEST_HTTP_CLIENT=httpx` (or
`aiohttp`, `sdk`) runs the whole fault suite on another one."""


def teacher_cfg(url: str | list[str], **kw: Any) -> TeacherConfig:
    base: dict[str, Any] = dict(backend="openai", model="fake-model", base_url=url,
                                api_key_env=KEY_ENV, max_concurrency=4, timeout_s=2.0,
                                max_retries=3, http_client=HTTP_CLIENT)
    base.update(kw)
    return TeacherConfig(**base)


def fast_teacher(cfg: TeacherConfig, **kw: Any) -> OpenAITeacher:
    opts: dict[str, Any] = dict(backoff_base_s=0.01, backoff_cap_s=0.05, replica_cooldown_s=0.3)
    opts.update(kw)
    return OpenAITeacher(cfg, **opts)


def make_jobs(n: int, samples: int = 1, *, max_tokens: int = 16, top_logprobs: int = 0,
              prefix: str = "q") -> list[Job]:
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=max_tokens, seed=11,
                            top_logprobs=top_logprobs)
    return [Job(key=f"{prefix}{i}", messages=[{"role": "user", "content": f"{prefix}{i}"}],
                params=params, samples=list(range(samples))) for i in range(n)]


def run(teacher: Any, jobs: list[Job], cache: ResponseCache | None = None
        ) -> tuple[dict[tuple[str, int], Completion], EngineStats]:
    return run_jobs(teacher, jobs, cache, show_progress=False)


def assert_all_ok(results: dict[tuple[str, int], Completion], jobs: list[Job]) -> None:
    expected = {(j.key, s) for j in jobs for s in j.samples}
    assert set(results) == expected
    errors = {k: c.error for k, c in results.items() if c.error}
    assert not errors, errors
    assert all(c.text for c in results.values())


# the happy path and the request shape --------------------------------------------------------
def test_n_samples_in_one_request_with_params_and_usage(fake_server: FakeServer) -> None:
    cfg = teacher_cfg(fake_server.url, extra_body={"chat_template_kwargs": {"x": 1}})
    jobs = make_jobs(5, samples=3)
    results, stats = run(fast_teacher(cfg), jobs)
    assert_all_ok(results, jobs)
    reqs = fake_server.chat_requests()
    assert len(reqs) == 5
    body = reqs[0].body
    assert body["n"] == 3 and body["temperature"] == 0.7 and body["top_p"] == 0.9
    assert body["max_tokens"] == 16 and body["seed"] == 11 and body["model"] == "fake-model"
    assert body["chat_template_kwargs"] == {"x": 1} and "logprobs" not in body
    assert {results[("q0", s)].text for s in range(3)} == {
        f"echo: q0 [seed=11 choice={i}]" for i in range(3)}
    # Usage is split over the choices and adds up to what the server billed.
    billed = [chat_body(r)["usage"] for r in reqs]
    assert stats.prompt_tokens == sum(u["prompt_tokens"] for u in billed)
    assert stats.completion_tokens == sum(u["completion_tokens"] for u in billed)
    assert all(c.latency_s > 0 and c.finish_reason == "stop" for c in results.values())


def test_server_without_n_gets_one_request_per_sample(fake_server: FakeServer) -> None:
    def handler(req: Request) -> Reply:
        if req.n > 1:
            return Reply(400, error_body("n > 1 is not supported", type_="invalid_request_error",
                                         param="n"))
        return ok(req)

    fake_server.handler = handler
    teacher = fast_teacher(teacher_cfg(fake_server.url))
    jobs = make_jobs(3, samples=4)
    results, _ = run(teacher, jobs)
    assert_all_ok(results, jobs)
    assert not teacher.n_supported
    singles = [r for r in fake_server.chat_requests() if r.n == 1]
    assert len(singles) == 12
    # Each sample has its own seed, so one-sample requests do not all return the same text.
    assert len({results[("q0", s)].text for s in range(4)}) == 4


def test_samples_of_one_prompt_run_in_parallel_without_n(fake_servers: Any) -> None:
    def handler(req: Request) -> Reply:
        if req.n > 1:
            return Reply(400, error_body("only n=1 is supported", type_="invalid_request_error"))
        return ok(req)

    server = fake_servers(handler, latency=0.2)
    jobs = make_jobs(1, samples=8)
    t0 = time.monotonic()
    results, _ = run(fast_teacher(teacher_cfg(server.url, max_concurrency=8)), jobs)
    assert_all_ok(results, jobs)
    assert server.chat_count == 9 and time.monotonic() - t0 < 1.2  # not 8 x 0.2 s in a row


def test_fewer_choices_than_asked_are_requested_again(fake_server: FakeServer) -> None:
    def handler(req: Request) -> Reply:
        body = chat_body(req)
        if req.n > 1:
            body["choices"] = body["choices"][:-1]
        return Reply(body=body)

    fake_server.handler = handler
    jobs = make_jobs(4, samples=3)
    results, _ = run(fast_teacher(teacher_cfg(fake_server.url)), jobs)
    assert_all_ok(results, jobs)
    assert fake_server.chat_count == 8  # n=3 returns 2, then n=1 for the last one


def test_server_ignoring_n_is_detected(fake_server: FakeServer) -> None:
    fake_server.handler = lambda req: Reply(body=chat_body(req, n=1))
    teacher = fast_teacher(teacher_cfg(fake_server.url, max_concurrency=1))
    jobs = make_jobs(3, samples=3)
    results, _ = run(teacher, jobs)
    assert_all_ok(results, jobs)
    assert not teacher.n_supported and fake_server.chat_count == 9


def test_max_completion_tokens_adaptation(fake_server: FakeServer) -> None:
    def handler(req: Request) -> Reply:
        if "max_tokens" in req.body:
            return Reply(400, error_body("Unsupported parameter: 'max_tokens'. Use "
                                         "'max_completion_tokens' instead.", type_="invalid"))
        return ok(req)

    fake_server.handler = handler
    jobs = make_jobs(3)
    results, _ = run(fast_teacher(teacher_cfg(fake_server.url, max_concurrency=1)), jobs)
    assert_all_ok(results, jobs)
    assert fake_server.chat_requests()[-1].body["max_completion_tokens"] == 16


# faults --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", [
    Reply(500, error_body("boom")),
    Reply(503, error_body("overloaded")),
    Reply(drop=True),
    Reply(body="{this is not json"),
    Reply(body={"id": "x", "object": "chat.completion", "choices": []}),
    Reply(body={"error": {"message": "upstream failed"}}),
    Reply(delay=1.0),
], ids=["500", "503", "dropped", "malformed", "no-choices", "error-body", "timeout"])
def test_transient_faults_are_retried(fake_server: FakeServer, fault: Reply) -> None:
    fake_server.handler = per_prompt(2, fault)
    teacher = fast_teacher(teacher_cfg(fake_server.url, timeout_s=0.3))
    jobs = make_jobs(4, samples=2)
    results, stats = run(teacher, jobs)
    assert_all_ok(results, jobs)
    assert fake_server.chat_count == 12  # two failures and one success per prompt
    assert all(c.extra.get("attempts") == 3 for c in results.values())
    assert stats.failed == 0 and teacher.counters["retries"] == 8


@pytest.mark.parametrize("fault,why,kind", [
    (Reply(500, error_body("boom")), "HTTP 500: boom", "server"),
    (Reply(body="<html>bad gateway</html>"), "malformed response", "malformed"),
    (Reply(body={"choices": []}), "empty response", "empty"),
    (lambda req: Reply(body=chat_body(req, texts=[""] * req.n)), "empty content", "empty"),
    (Reply(drop=True), "connection error", "connection"),
], ids=["500", "malformed", "no-choices", "empty-content", "dropped"])
def test_persistent_faults_end_as_error_rows(fake_server: FakeServer, fault: Any,
                                              why: str, kind: str) -> None:
    fake_server.handler = fault if callable(fault) else (lambda req: fault)
    teacher = fast_teacher(teacher_cfg(fake_server.url, max_retries=2))
    jobs = make_jobs(3, samples=2)
    results, stats = run(teacher, jobs)
    assert set(results) == {(j.key, s) for j in jobs for s in j.samples}
    for comp in results.values():
        assert comp.error and why in comp.error and "gave up after 3 attempts" in comp.error
        assert comp.error_kind == kind
    assert fake_server.chat_count == 9 and stats.failed == 6


@pytest.mark.parametrize("body", [
    {"choices": [None, 3, "x"]},
    {"choices": [{"index": "zero", "message": "not a dict", "finish_reason": 5}]},
    {"choices": [{"message": {"content": ["parts"]}}], "usage": "lots"},
    {"choices": "all of them"},
    [1, 2, 3],
], ids=["null-choices", "odd-types", "list-content", "choices-string", "json-list"])
def test_odd_bodies_end_as_rows(fake_server: FakeServer, body: Any) -> None:
    fake_server.handler = lambda req: Reply(body=body)
    jobs = make_jobs(2, samples=2)
    results, stats = run(fast_teacher(teacher_cfg(fake_server.url, max_retries=1)), jobs)
    assert set(results) == {(j.key, s) for j in jobs for s in j.samples}
    assert stats.failed == 4 and all(c.error for c in results.values())


def test_bad_request_is_not_retried(fake_server: FakeServer) -> None:
    fake_server.handler = lambda req: Reply(400, error_body("context too long",
                                                            type_="invalid_request_error"))
    jobs = make_jobs(3)
    results, _ = run(fast_teacher(teacher_cfg(fake_server.url)), jobs)
    assert all(c.error == "HTTP 400: context too long" for c in results.values())
    assert all(c.error_kind == "bad_request" for c in results.values())
    assert fake_server.chat_count == 3


def test_unauthorized_stops_the_run(fake_server: FakeServer) -> None:
    fake_server.handler = lambda req: Reply(401, error_body("bad key", type_="auth"))
    jobs = make_jobs(40)
    results, stats = run(fast_teacher(teacher_cfg(fake_server.url, max_concurrency=2)), jobs)
    assert len(results) == 40 and stats.failed == 40
    assert all("HTTP 401" in (c.error or "") for c in results.values())
    assert {c.error_kind for c in results.values()} == {"auth"}  # the rest: "not sent: HTTP 401"
    assert fake_server.chat_count <= 4  # only what was already in flight


def test_handler_crash_never_raises(fake_server: FakeServer) -> None:
    def handler(req: Request) -> Reply:
        raise RuntimeError("script bug")

    fake_server.handler = handler
    jobs = make_jobs(2, samples=2)
    results, _ = run(fast_teacher(teacher_cfg(fake_server.url, max_retries=1)), jobs)
    assert len(results) == 4 and all("HTTP 500" in (c.error or "") for c in results.values())


# finish reasons ------------------------------------------------------------------------------
def _finish(reason: str, times: int | None = None) -> Any:
    fault = lambda req: Reply(body=chat_body(req, finish_reason=reason))  # noqa: E731
    return per_prompt(times, fault) if times is not None else fault


@pytest.mark.parametrize("reason,policy_key", [("length", "on_length"),
                                               ("content_filter", "on_content_filter")])
def test_finish_reason_policies(fake_server: FakeServer, reason: str, policy_key: str) -> None:
    jobs = make_jobs(2, samples=2)

    fake_server.handler = _finish(reason)
    results, _ = run(fast_teacher(teacher_cfg(fake_server.url, **{policy_key: "keep"})), jobs)
    assert_all_ok(results, jobs)
    assert all(c.finish_reason == reason for c in results.values())

    results, stats = run(fast_teacher(teacher_cfg(fake_server.url, **{policy_key: "drop"})), jobs)
    assert all(c.error == f"dropped: finish_reason={reason}" if reason == "content_filter"
               else (c.error or "").startswith("dropped: finish_reason=length")
               for c in results.values())
    assert all(c.error_kind == "dropped" for c in results.values())
    assert stats.failed == 4

    fake_server.reset()
    fake_server.handler = _finish(reason, times=1)
    results, _ = run(fast_teacher(teacher_cfg(fake_server.url, **{policy_key: "retry"})), jobs)
    assert_all_ok(results, jobs)
    assert all(c.finish_reason == "stop" for c in results.values())
    reqs = fake_server.chat_requests()
    assert len(reqs) == 4 and reqs[0].body["seed"] != reqs[-1].body["seed"]  # resampled

    fake_server.handler = _finish(reason)
    results, _ = run(fast_teacher(teacher_cfg(fake_server.url, max_retries=1,
                                              **{policy_key: "retry"})), jobs)
    assert all(reason in (c.error or "") and "gave up" in (c.error or "")
               for c in results.values())


# rate limits ---------------------------------------------------------------------------------
def test_429_honours_retry_after(fake_server: FakeServer) -> None:
    fake_server.handler = first_n(1, Reply(429, error_body("slow down", type_="requests"),
                                           headers={"retry-after-ms": "300"}))
    teacher = fast_teacher(teacher_cfg(fake_server.url, max_concurrency=1))
    results, _ = run(teacher, make_jobs(1))
    assert_all_ok(results, make_jobs(1))
    first, second = fake_server.chat_requests()
    assert second.at - first.at >= 0.28
    assert teacher.counters["rate_limited"] == 1


def test_503_with_retry_after_waits(fake_server: FakeServer) -> None:
    fake_server.handler = first_n(1, Reply(503, error_body("warming up"),
                                           headers={"retry-after": "0.3"}))
    results, _ = run(fast_teacher(teacher_cfg(fake_server.url, max_concurrency=1)),
                     make_jobs(1))
    assert_all_ok(results, make_jobs(1))
    first, second = fake_server.chat_requests()
    assert second.at - first.at >= 0.28


def test_429_storm_pauses_every_worker(fake_server: FakeServer) -> None:
    fake_server.handler = first_n(4, Reply(429, error_body("rate limited", type_="tokens"),
                                           headers={"retry-after": "0.5"}))
    teacher = fast_teacher(teacher_cfg(fake_server.url, max_concurrency=4), storm_threshold=3)
    jobs = make_jobs(12)
    t0 = time.monotonic()
    results, _ = run(teacher, jobs)
    assert_all_ok(results, jobs)
    reqs = fake_server.chat_requests()
    storm = reqs[2].at  # the third 429 calls the storm (as soon as the client reads it)
    # From then on nothing at all is sent until the pause is over.
    assert not [r for r in reqs if storm + 0.05 < r.at < storm + 0.45]
    assert len([r for r in reqs if r.at >= storm + 0.45]) >= 4  # the retried ones at least
    assert teacher.counters["storms"] >= 1 and time.monotonic() - t0 < 5


def test_quota_exhausted_is_fatal(fake_server: FakeServer) -> None:
    fake_server.handler = lambda req: Reply(429, error_body("You exceeded your current quota",
                                                            type_="insufficient_quota",
                                                            code="insufficient_quota"))
    results, _ = run(fast_teacher(teacher_cfg(fake_server.url, max_concurrency=1)),
                     make_jobs(5))
    assert all("quota" in (c.error or "") for c in results.values())
    assert fake_server.chat_count == 1


def test_requests_per_minute_limit(fake_server: FakeServer) -> None:
    # 1200/min = 20/s with a 1 s burst of 20: 30 requests need at least 0.5 s.
    cfg = teacher_cfg(fake_server.url, max_concurrency=16, requests_per_minute=1200)
    jobs = make_jobs(30)
    t0 = time.monotonic()
    results, _ = run(fast_teacher(cfg), jobs)
    elapsed = time.monotonic() - t0
    assert_all_ok(results, jobs)
    assert 0.45 <= elapsed < 5
    reqs = fake_server.chat_requests()
    assert reqs[-1].at - reqs[0].at >= 0.3  # the 10 beyond the burst trickle in at 20/s


def test_tokens_per_minute_limit(fake_server: FakeServer) -> None:
    # Each request takes 4 prompt + 16 max tokens = 20 (and bills all of them, so nothing is
    # refunded); 60k/min = 1000/s with a burst of 1000: 80 requests need at least 0.6 s.
    fake_server.handler = lambda req: Reply(body=chat_body(
        req, usage={"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20}))
    cfg = teacher_cfg(fake_server.url, max_concurrency=16, tokens_per_minute=60_000)
    jobs = make_jobs(80)
    t0 = time.monotonic()
    results, _ = run(fast_teacher(cfg), jobs)
    assert_all_ok(results, jobs)
    assert 0.5 <= time.monotonic() - t0 < 5


def test_token_bucket_debt_for_large_requests() -> None:
    async def go() -> float:
        bucket = TokenBucket(rate_per_s=100.0, capacity=10.0)
        t0 = time.monotonic()
        await bucket.acquire(10)  # the burst
        await bucket.acquire(50)  # larger than the bucket: waits for a full one, goes negative
        await bucket.acquire(1)   # pays the debt back first
        return time.monotonic() - t0

    elapsed = asyncio.run(go())
    assert 0.5 <= elapsed < 1.5


def test_parse_retry_after() -> None:
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


# budget --------------------------------------------------------------------------------------
@pytest.mark.parametrize("concurrency", [1, 4])
def test_budget_stops_before_crossing(fake_server: FakeServer, concurrency: int) -> None:
    # $1000 per Mtok of output = $0.001 per token; each request reserves 10 tokens ($0.01)
    # and the server bills 5 output tokens ($0.005), so about 9 of 30 requests fit in $0.05.
    fake_server.handler = lambda req: Reply(body=chat_body(
        req, usage={"prompt_tokens": 0, "completion_tokens": 5, "total_tokens": 5}))
    cfg = teacher_cfg(fake_server.url, max_concurrency=concurrency, max_cost_usd=0.05,
                      price_out_per_mtok=1000.0)
    teacher = fast_teacher(cfg)
    jobs = make_jobs(30, max_tokens=10)
    results, stats = run_jobs(teacher, jobs, None, price_out=1000.0, show_progress=False)
    sent = [c for c in results.values() if not c.error]
    stopped = [c for c in results.values() if c.error]
    assert len(results) == 30 and stats.budget_stopped and teacher.budget_stopped
    assert len(sent) == fake_server.chat_count and 8 <= len(sent) <= 9
    assert all(c.error.startswith("budget: max_cost_usd 0.05 reached") and
               c.error.endswith("not sent") and c.error_kind == "budget" for c in stopped)
    assert stats.cost_usd <= 0.05 + 1e-9 and teacher.budget.spent <= 0.05 + 1e-9


def test_budget_waits_for_reservations_to_settle() -> None:
    async def go() -> tuple[float, bool]:
        budget = Budget(0.02, price_in=0.0, price_out=1000.0)
        first = await budget.reserve(0, 10)  # $0.01 reserved
        second = await budget.reserve(0, 10)  # $0.02: full
        waiter = asyncio.create_task(budget.reserve(0, 10))
        await asyncio.sleep(0.01)
        assert not waiter.done()  # fits only if the earlier ones cost less than reserved
        await budget.settle(first, 0, 2)
        await budget.settle(second, 0, 2)
        return await asyncio.wait_for(waiter, 1), budget.closed

    reserved, closed = asyncio.run(go())
    assert reserved == pytest.approx(0.01) and not closed


# reasoning and logprobs ----------------------------------------------------------------------
@pytest.mark.parametrize("message,reasoning,text", [
    ({"content": "42", "reasoning_content": "6*7"}, "6*7", "42"),
    ({"content": "42", "reasoning": "6*7"}, "6*7", "42"),
    ({"content": "<think>6*7</think>\n42"}, "6*7", "42"),
    ({"content": "6*7</think>42"}, "6*7", "42"),
    ({"content": "<think>a</think>x<think>b</think>y"}, "a\n\nb", "xy"),
    ({"content": "<think>cut off by max_tok"}, "cut off by max_tok", ""),
    ({"content": "<think>b</think>42", "reasoning_content": "a"}, "a\n\nb", "42"),
    ({"content": "no reasoning"}, None, "no reasoning"),
    ({"content": None, "reasoning_content": "only thoughts"}, "only thoughts", ""),
])
def test_reasoning_normalization(message: dict[str, Any], reasoning: str | None,
                                 text: str) -> None:
    assert normalize_message(message) == (reasoning, text)


def test_reasoning_from_server(fake_server: FakeServer) -> None:
    def handler(req: Request) -> Reply:
        if req.prompt == "q0":
            return Reply(body=chat_body(req, texts=["42"], reasoning="six times seven"))
        if req.prompt == "q1":
            return Reply(body=chat_body(req, texts=["42"], reasoning="six times seven",
                                        reasoning_field="reasoning"))
        return Reply(body=chat_body(req, texts=["<think>six times seven</think>\n\n42"]))

    fake_server.handler = handler
    jobs = make_jobs(3)
    results, _ = run(fast_teacher(teacher_cfg(fake_server.url)), jobs)
    for key in ("q0", "q1", "q2"):
        assert results[(key, 0)].reasoning == "six times seven"
        assert results[(key, 0)].text == "42"
    assert split_think("plain") == (None, "plain")


def test_top_logprobs_captured(fake_server: FakeServer) -> None:
    fake_server.handler = lambda req: Reply(body=chat_body(req, texts=["the answer is"] * req.n))
    jobs = make_jobs(2, samples=2, top_logprobs=3)
    results, _ = run(fast_teacher(teacher_cfg(fake_server.url)), jobs)
    assert_all_ok(results, jobs)
    body = fake_server.chat_requests()[0].body
    assert body["logprobs"] is True and body["top_logprobs"] == 3
    lp = results[("q0", 1)].top_logprobs
    assert lp is not None and len(lp) == 3  # one entry per generated token
    assert lp[0] == [("the", -0.1), ("the~1", -1.1), ("the~2", -2.1)]


def test_missing_usage_is_estimated(fake_server: FakeServer) -> None:
    fake_server.handler = lambda req: Reply(body=chat_body(req, usage=False))
    results, stats = run(fast_teacher(teacher_cfg(fake_server.url)), make_jobs(2))
    assert all(c.extra.get("usage_estimated") and c.completion_tokens > 0
               for c in results.values())
    assert stats.prompt_tokens > 0


# replicas ------------------------------------------------------------------------------------
def test_failover_to_a_healthy_replica(fake_servers: Any) -> None:
    good = fake_servers(latency=0.01)
    bad = fake_servers(lambda req: Reply(503, error_body("down")))
    bad.healthy = False
    teacher = fast_teacher(teacher_cfg([bad.url, good.url], max_concurrency=2))
    jobs = make_jobs(30)
    results, stats = run(teacher, jobs)
    assert_all_ok(results, jobs)
    # The bad replica is benched after 3 straight failures (a couple more may be in flight)
    # and its failed requests went to the good one.
    assert bad.chat_count <= 5 and good.chat_count == 30
    assert teacher.counters["failovers"] >= 1 and stats.failed == 0


def test_dead_replica_connection_refused(fake_servers: Any) -> None:
    good = fake_servers()
    dead = FakeServer().start()
    dead_url = dead.url
    dead.stop()  # nothing listens there any more
    jobs = make_jobs(10)
    results, _ = run(fast_teacher(teacher_cfg([dead_url, good.url])), jobs)
    assert_all_ok(results, jobs)
    assert good.chat_count == 10


def test_all_replicas_down_ends_as_errors_in_bounded_time() -> None:
    dead = [FakeServer().start() for _ in range(2)]
    urls = [d.url for d in dead]
    for d in dead:
        d.stop()
    cfg = teacher_cfg(urls, max_retries=2, timeout_s=0.5)
    t0 = time.monotonic()
    results, stats = run(fast_teacher(cfg, replica_cooldown_s=0.1, replica_max_failures=1),
                         make_jobs(6))
    assert stats.failed == 6 and time.monotonic() - t0 < 10
    assert all("connection error" in (c.error or "") for c in results.values())


def test_replica_is_probed_before_reuse() -> None:
    now = [0.0]
    probes: list[str] = []
    verdict = {"b": False}

    async def probe(r: Replica) -> bool:
        probes.append(r.url)
        return verdict[r.url]

    async def go() -> None:
        pool = ReplicaPool([Replica("a"), Replica("b")], max_failures=2, cooldown_s=10,
                           probe=probe, clock=lambda: now[0])
        a, b = pool.replicas
        for _ in range(2):
            pool.failure(b, "HTTP 503")
        for _ in range(4):
            pick = await pool.acquire()
            pool.release(pick)
            assert pick is a and probes == []  # benched: no traffic, no probe
        now[0] = 11.0  # cooldown over: probe first; it fails, so b is benched again (longer)
        for _ in range(4):
            pool.release(await pool.acquire())
        assert probes == ["b"] and b.unhealthy_until == pytest.approx(31.0)
        now[0] = 32.0
        verdict["b"] = True
        chosen = {(await pool.acquire()).url for _ in range(4)}
        assert probes == ["b", "b"] and chosen == {"a", "b"}

    asyncio.run(go())


# cache, resume, secrets ----------------------------------------------------------------------
def test_cache_second_run_sends_nothing(fake_server: FakeServer, tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "cache.sqlite")
    jobs = make_jobs(6, samples=2)
    first, stats1 = run(fast_teacher(teacher_cfg(fake_server.url)), jobs, cache)
    assert_all_ok(first, jobs) and stats1.sent == 12
    sent = fake_server.chat_count
    second, stats2 = run(fast_teacher(teacher_cfg(fake_server.url)), jobs, cache)
    assert fake_server.chat_count == sent and stats2.cached == 12 and stats2.sent == 0
    assert {k: c.text for k, c in second.items()} == {k: c.text for k, c in first.items()}


def test_cache_is_a_context_manager_that_closes(fake_server: FakeServer,
                                                 tmp_path: Path) -> None:
    jobs = make_jobs(2)
    with ResponseCache(tmp_path / "cache.sqlite") as cache:
        run(fast_teacher(teacher_cfg(fake_server.url)), jobs, cache)
        assert len(cache) == 2
    with pytest.raises(sqlite3.ProgrammingError):  # closed when the block ended
        len(cache)
    with pytest.raises(RuntimeError), ResponseCache(tmp_path / "cache.sqlite") as cache:
        raise RuntimeError("a stage failed")
    with pytest.raises(sqlite3.ProgrammingError):  # closed on an error as well
        len(cache)
    with ResponseCache(tmp_path / "cache.sqlite") as cache:
        assert len(cache) == 2  # nothing lost


def test_cached_errors_from_before_kinds_get_one() -> None:
    old = Completion(text="cut", error="dropped: finish_reason=length").to_json()
    del old["error_kind"]
    assert Completion.from_json(old).error_kind == "dropped"
    assert Completion.from_json(old | {"error": "HTTP 500: x"}).error_kind == "other"
    assert Completion.from_json(Completion(text="ok").to_json()).error_kind is None


def test_generate_batch_answers_in_batch_order(fake_server: FakeServer) -> None:
    teacher = make_teacher(teacher_cfg(fake_server.url))
    jobs = make_jobs(3, samples=2)
    batch = [(jobs[2], 1), (jobs[0], 0), (jobs[2], 0), (jobs[1], 1)]
    comps = teacher.generate_batch(batch)
    assert [c.text for c in comps] == [
        "echo: q2 [seed=11 choice=1]", "echo: q0 [seed=11 choice=0]",
        "echo: q2 [seed=11 choice=0]", "echo: q1 [seed=12 choice=0]"]
    assert fake_server.chat_count == 3  # one request per prompt: q2's samples share it
    again = teacher.generate_batch(batch)  # a second event loop: the clients reopen
    assert [c.text for c in again] == [c.text for c in comps] and fake_server.chat_count == 6


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from distill.config import TeacherConfig
    from distill.teachers.base import Job, SamplingParams
    from distill.teachers.cache import ResponseCache
    from distill.teachers.engine import run_jobs
    from distill.teachers.openai_backend import OpenAITeacher

    url, cache_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = TeacherConfig(backend="openai", model="fake-model", base_url=url, api_key_env=None,
                        max_concurrency=3)
    params = SamplingParams(max_tokens=16, seed=11)
    jobs = [Job(key=f"q{i}", messages=[{"role": "user", "content": f"q{i}"}], params=params,
                samples=[0, 1]) for i in range(n)]
    run_jobs(OpenAITeacher(cfg), jobs, ResponseCache(Path(cache_path)), show_progress=False)
    print("finished", flush=True)
""")


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_sigkill_midway_then_rerun_sends_only_what_is_missing(tmp_path: Path) -> None:
    n_jobs, kill_after = 40, 15
    cache_path = tmp_path / "cache.sqlite"
    with FakeServer(latency=0.03) as server:
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, server.url, str(cache_path),
                                 str(n_jobs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while server.chat_count < kill_after and time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"worker exited early: {proc.communicate()}")
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        seen_before = server.chat_count
        assert kill_after <= seen_before < n_jobs

        with sqlite3.connect(cache_path) as db:
            cached_keys = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        assert cached_keys % 2 == 0 and 0 < cached_keys < 2 * n_jobs  # whole prompts only
        prompts_done = cached_keys // 2

        cache = ResponseCache(cache_path)
        cfg = teacher_cfg(server.url, api_key_env=None, max_concurrency=3)
        params = SamplingParams(max_tokens=16, seed=11)
        jobs = [Job(key=f"q{i}", messages=[{"role": "user", "content": f"q{i}"}],
                    params=params, samples=[0, 1]) for i in range(n_jobs)]
        results, stats = run(OpenAITeacher(cfg), jobs, cache)

        rerun = server.chat_requests()[seen_before:]
        assert len(rerun) == n_jobs - prompts_done  # only what was missing
        assert len({r.prompt for r in server.chat_requests()}) == n_jobs
        assert stats.cached == cached_keys and stats.failed == 0
        assert_all_ok(results, jobs)
        assert len(cache) == 2 * n_jobs
        cache.close()


def test_api_key_never_leaks(fake_server: FakeServer, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                             capsys: pytest.CaptureFixture[str]) -> None:
    secret = "sk-distill-SECRET-7f3a9c1e5b2d4680"
    monkeypatch.setenv(KEY_ENV, secret)
    monkeypatch.setenv("OPENAI_LOG", "debug")
    caplog.set_level(logging.DEBUG)

    def handler(req: Request) -> Reply:
        if req.prompt == "q0":  # a careless server that echoes the credentials back
            auth = req.headers.get("authorization", "")
            return Reply(400, error_body(f"invalid request for {auth}", type_="invalid"))
        if req.prompt == "q1":
            return Reply(500, error_body("flaky"))
        return ok(req)

    fake_server.handler = handler
    cache_path = tmp_path / "cache.sqlite"
    cache = ResponseCache(cache_path)
    cfg = teacher_cfg(fake_server.url, max_retries=1)
    teacher = fast_teacher(cfg)
    results, _ = run_jobs(teacher, make_jobs(5, samples=2), cache, show_progress=True)
    cache.close()

    assert fake_server.chat_requests()[0].headers["authorization"] == f"Bearer {secret}"
    assert results[("q0", 0)].error and "***" in results[("q0", 0)].error
    texts = [caplog.text, *capsys.readouterr(), repr(teacher), str(vars(teacher)),
             cfg.model_dump_json(), *(repr(c) for c in results.values())]
    assert all(secret not in t for t in texts)
    for path in tmp_path.iterdir():
        assert secret.encode() not in path.read_bytes(), path


def test_missing_key_and_local_dummy_key(fake_server: FakeServer,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"teacher.api_key_env: environment variable {KEY_ENV}"):
        OpenAITeacher(teacher_cfg("https://api.example.com/v1"))
    results, _ = run(fast_teacher(teacher_cfg(fake_server.url)), make_jobs(1))
    assert_all_ok(results, make_jobs(1))
    assert fake_server.chat_requests()[0].headers["authorization"] == "Bearer EMPTY"


def test_make_teacher_and_estimate() -> None:
    cfg = teacher_cfg("http://localhost:8000/v1", price_in_per_mtok=2.0, price_out_per_mtok=8.0,
                      max_cost_usd=1.0)
    assert isinstance(make_teacher(cfg), OpenAITeacher)
    jobs = make_jobs(10, samples=4, max_tokens=100)
    jobs[0].messages = [{"role": "system", "content": "x" * 400}, {"role": "user", "content": "q"}]
    est = estimate(cfg, jobs)
    prompt = 9 * (len("q1") // 4 + 4) + (400 // 4 + 1 // 4 + 8)
    assert est["requests"] == 10 and est["requests_if_no_n"] == 40 and est["samples"] == 40
    assert est["est_prompt_tokens"] == prompt and est["max_completion_tokens"] == 4000
    assert est["est_cost_usd"] == pytest.approx((prompt * 2 + 4000 * 8) / 1e6)
    assert est["within_budget"] is True


def test_empty_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="teacher.model"):
        OpenAITeacher(teacher_cfg("http://localhost:1/v1", model=""))



def test_dropped_responses_are_cached_and_not_paid_twice(fake_server: FakeServer,
                                                         tmp_path: Path) -> None:
    """A content-filtered answer was delivered and billed: a rerun must not buy it again."""
    jobs = make_jobs(2, samples=2)
    fake_server.handler = _finish("content_filter")
    cache = ResponseCache(tmp_path / "cache.sqlite")
    cfg = teacher_cfg(fake_server.url, on_content_filter="drop")
    first, _ = run_jobs(fast_teacher(cfg), jobs, cache, show_progress=False)
    sent = fake_server.chat_count
    again, stats = run_jobs(fast_teacher(cfg), jobs, cache, show_progress=False)
    cache.close()
    assert stats.sent == 0 and fake_server.chat_count == sent
    assert {k: c.error for k, c in again.items()} == {k: c.error for k, c in first.items()}
    assert all(c.error_kind == "dropped" for c in again.values())


# what a server ignores -----------------------------------------------------------------------
def like_transformers_serve(req: Request) -> Reply:
    """Ignores `n`, `logprobs` and `top_logprobs` and answers 200, as `transformers serve` does:
    one choice and no `logprobs` key at all."""
    body = chat_body(req, n=1)
    for choice in body["choices"]:
        del choice["logprobs"]
    return Reply(body=body)


def test_server_ignoring_n_loses_no_sample_without_retries(fake_server: FakeServer) -> None:
    """One choice for n = 3 is progress, not a failed attempt: max_retries 0 still gets all."""
    fake_server.handler = lambda req: Reply(body=chat_body(req, n=1))
    teacher = fast_teacher(teacher_cfg(fake_server.url, max_retries=0, max_concurrency=1))
    jobs = make_jobs(2, samples=3)
    results, _ = run(teacher, jobs)
    assert_all_ok(results, jobs)
    assert not teacher.n_supported and fake_server.chat_count == 6
    assert len({results[("q0", s)].text for s in range(3)}) == 3  # one seed per sample


def test_server_ignoring_logprobs_is_counted_and_warned(
        fake_server: FakeServer, caplog: pytest.LogCaptureFixture) -> None:
    fake_server.handler = like_transformers_serve
    teacher = fast_teacher(teacher_cfg(fake_server.url))
    jobs = make_jobs(3, samples=2, top_logprobs=5)
    with caplog.at_level(logging.WARNING, logger="distill.teachers.openai_backend"):
        results, _ = run(teacher, jobs)
    assert_all_ok(results, jobs)  # the text is fine, it is kept
    assert all(c.top_logprobs is None for c in results.values())
    assert teacher.logprobs_missing == 6 and fake_server.chat_count == 6
    warned = [r for r in caplog.records if "returned no logprobs" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert fake_server.chat_requests()[0].body["logprobs"] is True


@pytest.mark.parametrize("concurrency", [1, 4])
def test_missing_logprobs_stop_new_requests_when_required(fake_server: FakeServer,
                                                          concurrency: int) -> None:
    fake_server.handler = like_transformers_serve
    teacher = fast_teacher(teacher_cfg(fake_server.url, max_concurrency=concurrency),
                           require_logprobs=True)
    jobs = make_jobs(20, top_logprobs=5)
    results, _ = run(teacher, jobs)
    assert len(results) == 20
    # Only the requests on the wire when the first answer arrived were sent.
    assert 1 <= fake_server.chat_count <= concurrency
    answered = [c for c in results.values() if not c.error]
    assert len(answered) == fake_server.chat_count
    assert all(c.top_logprobs is None for c in answered)
    stopped = [c.error for c in results.values() if c.error]
    assert stopped and all(e.startswith("not sent: teacher.top_logprobs") for e in stopped)
    assert all(c.error_kind == "missing_logprobs" for c in results.values() if c.error)
    sent = fake_server.chat_count
    run(teacher, make_jobs(20, top_logprobs=5, prefix="r"))  # the same teacher, again
    assert 1 <= fake_server.chat_count - sent <= concurrency
    assert teacher.logprobs_missing == fake_server.chat_count


def test_cached_answers_without_logprobs_are_sent_again_when_needed(
        fake_server: FakeServer, tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "cache.sqlite")
    jobs = make_jobs(2, top_logprobs=3)
    fake_server.handler = like_transformers_serve
    run_jobs(fast_teacher(teacher_cfg(fake_server.url)), jobs, cache, show_progress=False)
    fake_server.handler = lambda req: Reply(body=chat_body(req, texts=["a b"] * req.n))
    reused, stats = run_jobs(fast_teacher(teacher_cfg(fake_server.url)), jobs, cache,
                             show_progress=False)
    assert stats.cached == 2 and fake_server.chat_count == 2
    assert all(c.top_logprobs is None for c in reused.values())
    fresh, stats = run_jobs(fast_teacher(teacher_cfg(fake_server.url)), jobs, cache,
                            show_progress=False, need_logprobs=True)
    assert stats.cached == 0 and fake_server.chat_count == 4
    assert all(c.top_logprobs for c in fresh.values())
    _, stats = run_jobs(fast_teacher(teacher_cfg(fake_server.url)), jobs, cache,
                        show_progress=False, need_logprobs=True)
    cache.close()
    assert stats.cached == 2 and fake_server.chat_count == 4  # the fresh ones were cached


# the generate stage on a server that drops logprobs ------------------------------------------
def stage_config(tmp_path: Path, url: str, **train: Any) -> PipelineConfig:
    """A cot pipeline: 12 seeds x 2 samples from `url` with top-5 logprobs, training `train`."""
    write_sum_project(tmp_path, 12)
    return PipelineConfig.model_validate({
        "name": "soft", "root": str(tmp_path), "seeds": {"path": "seeds.jsonl"},
        "teacher": {"backend": "openai", "model": "fake-model", "base_url": url,
                    "api_key_env": KEY_ENV, "max_concurrency": 2, "timeout_s": 5.0,
                    "top_logprobs": 5},
        "generate": {"prompt": "p.j2", "max_tokens": 16, "samples_per_prompt": 2},
        "train": train,
    })


@pytest.mark.parametrize("train", [{"method": "kd"}, {"method": "sft", "also": ["kd"]},
                                   {"method": "kd", "kd": {"soft_targets": "stored"}}])
def test_generate_fails_fast_when_kd_needs_the_missing_logprobs(
        fake_server: FakeServer, tmp_path: Path, train: dict[str, Any]) -> None:
    from distill.pipeline import run_stage
    from distill.records import RunDir

    fake_server.handler = like_transformers_serve
    cfg = stage_config(tmp_path, fake_server.url, **train)
    run_dir = RunDir(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^teacher\.top_logprobs: 5, but the openai teacher "
                                          r"at http://127\.0\.0\.1:\d+/v1 returned no logprobs"):
        run_stage("generate", cfg, run_dir)
    assert 1 <= fake_server.chat_count <= 2  # 12 prompts x 2 samples wanted, stopped at once
    assert run_dir.manifest()["stages"]["generate"]["status"] == "failed"
    assert not (run_dir.stage("generate") / "generations.jsonl").exists()


@pytest.mark.parametrize("train", [{"method": "sft"}, {"method": "gkd"},
                                   {"method": "kd", "kd": {"soft_targets": "teacher"}},
                                   {"method": "kd", "kd": {"teacher_model": "local/teacher"}}])
def test_generate_records_missing_logprobs_when_training_does_not_need_them(
        fake_server: FakeServer, tmp_path: Path, train: dict[str, Any]) -> None:
    from distill.pipeline import run_stage
    from distill.records import RunDir

    fake_server.handler = like_transformers_serve
    cfg = stage_config(tmp_path, fake_server.url, **train)
    entry = run_stage("generate", cfg, RunDir(tmp_path / "run"))
    assert entry["status"] == "done" and entry["errors"] == 0 and entry["rows"] == 24
    assert entry["soft_targets"] == "missing: server returned no logprobs"
    assert entry["soft_targets_missing"] == "24 of 24"


def test_generate_records_soft_targets_that_arrived(fake_server: FakeServer,
                                                    tmp_path: Path) -> None:
    from distill.pipeline import run_stage
    from distill.records import RunDir

    fake_server.handler = lambda req: Reply(body=chat_body(req, texts=["1 + 1 = 2"] * req.n))
    entry = run_stage("generate", stage_config(tmp_path, fake_server.url, method="kd"),
                      RunDir(tmp_path / "run"))
    assert entry["status"] == "done" and entry["soft_targets"] == "top-5 logprobs"
    assert "soft_targets_missing" not in entry


# the direct HTTP clients read every failure as the SDK does -----------------------------------
def test_direct_and_sdk_clients_agree_on_every_fault(fake_server: FakeServer) -> None:
    """`http_client: aiohttp` (the default, `direct`), `httpx` and `sdk` see the same faults
    and end with the same rows, errors, counters and request counts."""
    def make_handler() -> Any:
        hits: dict[str, int] = {}

        def handler(req: Request) -> Reply:
            hits[req.prompt] = hits.get(req.prompt, 0) + 1
            return script(req, hits[req.prompt])

        return handler

    def script(req: Request, hit: int) -> Reply:
        p = req.prompt
        if p == "q0":
            return Reply(400, error_body("bad request here", type_="invalid_request_error"))
        if p == "q1":
            return Reply(500, error_body("always broken"))
        if p == "q2":
            return Reply(429, error_body("slow down"), headers={"Retry-After": "0.01"}) \
                if hit == 1 else ok(req)
        if p == "q3":
            return Reply(200, b"{not json")
        if p == "q5":
            return Reply(delay=0.6)  # past timeout_s
        if p == "q6":
            return Reply(drop=True)
        return ok(req)

    outcomes = {}
    for client in ("aiohttp", "httpx", "sdk"):
        fake_server.reset()
        fake_server.handler = per_prompt(1, Reply(503, error_body("warming up"),
                                                  headers={"Retry-After": "0"}), make_handler())
        jobs = make_jobs(7, samples=2, prefix="q")
        cfg = teacher_cfg(fake_server.url, max_retries=2, max_concurrency=1, timeout_s=0.25,
                          http_client=client, extra_body={"chat_template_kwargs": {"t": 1}})
        teacher = fast_teacher(cfg)
        results, stats = run(teacher, jobs)
        outcomes[client] = ({k: (c.text, c.error, c.error_kind) for k, c in results.items()},
                            sorted(r.prompt for r in fake_server.chat_requests()),
                            fake_server.chat_requests()[-1].body["chat_template_kwargs"],
                            teacher.counters)
    assert outcomes["aiohttp"] == outcomes["httpx"] == outcomes["sdk"]
    errors = {k: e for k, (_, e, _) in outcomes["aiohttp"][0].items() if e}
    kinds = {k[0]: kind for k, (_, e, kind) in outcomes["aiohttp"][0].items() if e}
    assert kinds == {"q0": "bad_request", "q1": "server", "q3": "malformed", "q5": "timeout",
                     "q6": "connection"}
    assert errors[("q0", 0)] == "HTTP 400: bad request here"
    assert errors[("q1", 0)].startswith("HTTP 500: always broken (gave up after 3")
    assert errors[("q3", 0)].startswith("malformed response: not JSON")
    assert errors[("q5", 0)] == "timeout after 0.25s (gave up after 3 attempts)"
    assert errors[("q6", 0)] == "connection error (RemoteProtocolError) (gave up after 3 attempts)"
    assert ("q2", 0) not in errors and ("q4", 1) not in errors
    assert outcomes["aiohttp"][2] == {"t": 1}
    counters = outcomes["aiohttp"][3]
    assert counters["rate_limited"] == 1 and counters["timeouts"] == 2
    assert counters["connection_errors"] == 2 and counters["malformed"] == 2


def test_direct_is_the_aiohttp_client() -> None:
    from distill.teachers.direct_aiohttp import AiohttpClient
    from distill.teachers.direct_http import DirectClient
    from distill.teachers.openai_backend import direct_client

    assert direct_client("direct") is AiohttpClient and direct_client("aiohttp") is AiohttpClient
    assert direct_client("httpx") is DirectClient
    assert TeacherConfig(backend="openai", model="m").http_client == "direct"
