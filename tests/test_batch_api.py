"""`teacher.batch`: the OpenAI Batch API against a loopback server with the batch endpoints.

The fake server runs each batch line through the same scripted handler the online tests use, so
every fault of a line (500, 400, empty content) and of a batch (expired, cancelled, failed) is
scripted; each test checks what a user pays for: which batches were created, which lines the
provider ran, and that every sample ends as a row.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakeserver_fixture  # noqa: E402
from fakeserver import BatchPlan, FakeServer, Reply, Request, error_body, ok  # noqa: E402

from distill.config import PipelineConfig, TeacherConfig  # noqa: E402
from distill.teachers import make_teacher  # noqa: E402
from distill.teachers.base import Completion, Job, SamplingParams  # noqa: E402
from distill.teachers.batch import BatchTeacher  # noqa: E402
from distill.teachers.batch_files import (  # noqa: E402
    BatchRecord,
    make_line,
    split_lines,
    write_batch_jsonl,
)
from distill.teachers.cache import ResponseCache, cache_key  # noqa: E402
from distill.teachers.engine import EngineStats, run_jobs  # noqa: E402
from distill.teachers.estimate import estimate  # noqa: E402
from tests.projects import write_sum_project

fake_server = fakeserver_fixture.fake_server

pytestmark = pytest.mark.timeout(90)


def batch_cfg(url: str, **kw: Any) -> TeacherConfig:
    base: dict[str, Any] = dict(backend="openai", model="fake-model", base_url=url,
                                api_key_env=None, batch=True, batch_poll_s=0.02, max_retries=2,
                                timeout_s=5.0, price_in_per_mtok=2.0, price_out_per_mtok=8.0)
    base.update(kw)
    return TeacherConfig(**base)


def make_jobs(n: int, samples: int = 1, prefix: str = "q") -> list[Job]:
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=16, seed=11)
    return [Job(key=f"{prefix}{i}", messages=[{"role": "user", "content": f"{prefix}{i}"}],
                params=params, samples=list(range(samples))) for i in range(n)]


def run(cfg: TeacherConfig, jobs: list[Job], record: Path | None,
        cache: ResponseCache | None = None, **kw: Any
        ) -> tuple[dict[tuple[str, int], Completion], EngineStats, Any]:
    teacher = make_teacher(cfg, batch_record=record, **kw)
    results, stats = run_jobs(teacher, jobs, cache, price_in=cfg.price_in_per_mtok,
                              price_out=cfg.price_out_per_mtok, show_progress=False)
    return results, stats, teacher


def batch_lines(server: FakeServer, i: int) -> list[dict[str, Any]]:
    """The request lines of the i-th batch created on `server`."""
    body = server.batch.created[i]
    data = server.batch.files[body["input_file_id"]]["data"]
    return [json.loads(x) for x in data.splitlines()]


def assert_all_ok(results: dict[tuple[str, int], Completion], jobs: list[Job]) -> None:
    assert set(results) == {(j.key, s) for j in jobs for s in j.samples}
    errors = {k: c.error for k, c in results.items() if c.error}
    assert not errors, errors


# the happy path ------------------------------------------------------------------------------
def test_batch_happy_path_rows_usage_and_batch_price(fake_server: FakeServer,
                                                     tmp_path: Path) -> None:
    fake_server.batch.default = BatchPlan(after=0.3)
    cfg = batch_cfg(fake_server.url, extra_body={"chat_template_kwargs": {"x": 1}})
    jobs = make_jobs(4, samples=2)
    record = tmp_path / "generate" / "batches.json"
    cache = ResponseCache(tmp_path / "cache.sqlite")
    results, stats, teacher = run(cfg, jobs, record, cache)
    assert isinstance(teacher, BatchTeacher)
    assert_all_ok(results, jobs)
    assert fake_server.chat_count == 0  # nothing went online

    # One upload for purpose batch, one batch on /v1/chat/completions with a 24h window.
    assert len(fake_server.batch.created) == 1
    created = fake_server.batch.created[0]
    assert created["endpoint"] == "/v1/chat/completions"
    assert created["completion_window"] == "24h"
    lines = batch_lines(fake_server, 0)
    assert len(lines) == 8 and len({x["custom_id"] for x in lines}) == 8
    assert all(x["method"] == "POST" and x["url"] == "/v1/chat/completions" for x in lines)
    body = lines[0]["body"]
    assert body["model"] == "fake-model" and body["max_tokens"] == 16
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9
    assert body["chat_template_kwargs"] == {"x": 1} and "n" not in body
    assert sorted(x["body"]["seed"] for x in lines if x["body"]["messages"][0]["content"]
                  == "q0") == [11, 12]  # one seed per sample

    # The batch went validating -> in_progress -> completed, and each state was polled.
    seen = fake_server.batch.statuses[next(iter(fake_server.batch.batches))]
    assert seen[0] == "validating" and "in_progress" in seen and seen[-1] == "completed"

    # Usage is what the server billed; the cost is at half the online price.
    billed = [json.loads(json.dumps(ok(r).body))["usage"] for r in fake_server.batch.lines]
    p_tok = sum(u["prompt_tokens"] for u in billed)
    c_tok = sum(u["completion_tokens"] for u in billed)
    assert (stats.prompt_tokens, stats.completion_tokens) == (p_tok, c_tok)
    assert stats.cost_usd == pytest.approx(0.5 * (p_tok * 2.0 + c_tok * 8.0) / 1e6)
    comp = results[("q1", 1)]
    assert comp.text == "echo: q1 [seed=12 choice=0]" and comp.finish_reason == "stop"
    assert comp.extra["price_factor"] == 0.5 and comp.extra["served_model"] == "fake-model"

    # The batch id is on disk; a rerun finds everything in the cache and creates nothing.
    saved = json.loads(record.read_text())
    assert [b["id"] for b in saved["batches"]] == list(fake_server.batch.batches)
    assert saved["batches"][0]["collected"] and saved["batches"][0]["status"] == "completed"
    again, stats2, _ = run(cfg, jobs, record, cache)
    cache.close()
    assert stats2.cached == 8 and stats2.sent == 0 and len(fake_server.batch.created) == 1
    assert {k: c.text for k, c in again.items()} == {k: c.text for k, c in results.items()}


def test_without_a_record_path_requests_go_online(fake_server: FakeServer) -> None:
    """Judge and evaluate pass no record: they never batch (a kill could not resume)."""
    cfg = batch_cfg(fake_server.url)
    results, _, teacher = run(cfg, make_jobs(2), None)
    assert not isinstance(teacher, BatchTeacher)
    assert_all_ok(results, make_jobs(2))
    assert fake_server.chat_count == 2 and not fake_server.batch.created


# kill -9 after submission ----------------------------------------------------------------------
def generate_config(tmp_path: Path, url: str, n: int = 6) -> PipelineConfig:
    write_sum_project(tmp_path, n)
    return PipelineConfig.model_validate({
        "name": "batch", "root": str(tmp_path), "seeds": {"path": "seeds.jsonl"},
        "teacher": {"backend": "openai", "model": "fake-model", "base_url": url,
                    "api_key_env": None, "batch": True, "batch_poll_s": 0.05,
                    "price_in_per_mtok": 2.0, "price_out_per_mtok": 8.0},
        "generate": {"prompt": "p.j2", "max_tokens": 16, "samples_per_prompt": 2},
    })


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from test_batch_api import generate_config
    from distill.pipeline import run_stage
    from distill.records import RunDir

    tmp, url = Path(sys.argv[1]), sys.argv[2]
    run_stage("generate", generate_config(tmp, url), RunDir(tmp / "run"))
    print("finished", flush=True)
""")


def recorded_batches(record: Path) -> list[dict[str, Any]]:
    """The batches in the record (written atomically: a reader never sees half a file)."""
    return json.loads(record.read_text())["batches"] if record.exists() else []


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_kill_after_submission_then_rerun_polls_the_same_batch(tmp_path: Path) -> None:
    from distill.pipeline import run_stage
    from distill.records import RunDir, read_jsonl

    record = tmp_path / "run" / "generate" / "batches.json"
    with FakeServer() as server:
        server.batch.default = BatchPlan(after=2.0)
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_SCRIPT, str(tmp_path), server.url,
             str(Path(__file__).resolve().parent)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not recorded_batches(record) and time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"generate exited early: {proc.communicate()}")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        assert len(server.batch.created) == 1
        assert json.loads(record.read_text())["batches"][0]["collected"] is False

        entry = run_stage("generate", generate_config(tmp_path, server.url), RunDir(
            tmp_path / "run"))
        assert entry["status"] == "done" and entry["rows"] == 12 and entry["errors"] == 0
        assert len(server.batch.created) == 1  # polled, never submitted again
        assert len(server.batch.lines) == 12  # each sample ran (and was paid for) once
        assert server.chat_count == 0
        # The manifest counts lines per route: this process resumed the one batch, sent none.
        lines = entry["batch"]
        assert (lines["batches_resumed"], lines["lines_resumed"]) == (1, 12)
        assert lines["batches_submitted"] == lines["lines_online"] == lines["lines_follow_up"] == 0
        rows = read_jsonl(tmp_path / "run" / "generate" / "generations.jsonl")
        assert all(r["teacher_served"] == "fake-model" for r in rows)
        billed = sum(r["prompt_tokens"] * 2.0 + r["completion_tokens"] * 8.0 for r in rows) / 1e6
        assert entry["cost_usd"] == pytest.approx(0.5 * billed, abs=1e-6)
        # The record stays with the stage's output: the ids the data came from.
        kept = json.loads(record.read_text())["batches"]
        assert [b["id"] for b in kept] == list(server.batch.batches) and kept[0]["collected"]


def test_batch_created_but_not_recorded_is_found_by_its_tag(fake_server: FakeServer,
                                                            tmp_path: Path) -> None:
    """Killed between the provider creating the batch and the id reaching the record."""
    cfg = batch_cfg(fake_server.url)
    jobs = make_jobs(3)
    record_path = tmp_path / "batches.json"
    lines = [make_line(cfg, "openai", j, 0) for j in jobs]
    data = b"".join(x.data for x in lines)
    from openai import OpenAI

    client = OpenAI(base_url=fake_server.url, api_key="EMPTY")
    upload = client.files.create(file=("b.jsonl", data, "application/jsonl"), purpose="batch")
    record = BatchRecord(record_path)
    intent = record.intend(upload.id, [x.custom_id for x in lines])
    client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                          completion_window="24h", metadata={"distill_tag": intent["tag"]})
    client.close()

    results, _, teacher = run(cfg, jobs, record_path)
    assert_all_ok(results, jobs)
    assert len(fake_server.batch.created) == 1 and len(fake_server.batch.lines) == 3
    assert teacher.counters["batches_resumed"] == 1
    saved = json.loads(record_path.read_text())
    assert saved["intents"] == [] and len(saved["batches"]) == 1


# an answer lost on the way: the provider acted, the client never heard ------------------------
def lose_answers(server: FakeServer, monkeypatch: pytest.MonkeyPatch, what: str,
                 replies: list[Reply], *, acted: bool = True) -> None:
    """The next `len(replies)` uploads (`what="_upload"`) or batch creations (`"_create"`) are
    answered `replies[i]` (a dropped connection, a 500): after the server stored the file or
    created the batch (`acted`: a response lost on the way back), or instead of it."""
    api = server.batch
    real = getattr(api, what)
    left = list(replies)

    def lossy(req: Request) -> Reply:
        if not left:
            return real(req)
        fault = left.pop(0)
        if acted:
            real(req)
        return fault

    monkeypatch.setattr(api, what, lossy)


def serve_file_list(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /v1/files on the fake server (newest first, with each upload's filename), as the
    provider lists them."""
    api = server.batch
    names: dict[str, str] = {}
    real_upload, real_dispatch = api._upload, api.dispatch

    def upload(req: Request) -> Reply:
        reply = real_upload(req)
        if reply.status == 200:
            names[reply.body["id"]] = reply.body["filename"]
        return reply

    def dispatch(req: Request) -> Reply | None:
        if req.method == "GET" and req.path.rstrip("/") == "/v1/files":
            data = [{"id": fid, "object": "file", "bytes": len(f["data"]), "created_at": 0,
                     "filename": names.get(fid, "upload"), "purpose": "batch",
                     "status": "processed"}
                    for fid, f in reversed(list(api.files.items())) if f["purpose"] == "batch"]
            return Reply(body={"object": "list", "data": data, "has_more": False})
        return real_dispatch(req)

    monkeypatch.setattr(api, "_upload", upload)
    monkeypatch.setattr(api, "dispatch", dispatch)


def stored_inputs(server: FakeServer) -> int:
    """Batch input files the server stored (every upload that reached it)."""
    return sum(f["purpose"] == "batch" for f in server.batch.files.values())


def control_calls(server: FakeServer) -> list[str]:
    """The Batch API calls in order: "upload", "create", "list" (batches), "list files"."""
    names = {("POST", "/v1/files"): "upload", ("POST", "/v1/batches"): "create",
             ("GET", "/v1/batches"): "list", ("GET", "/v1/files"): "list files"}
    return [names[(r.method, r.path.rstrip("/"))] for r in server.requests
            if (r.method, r.path.rstrip("/")) in names]


@pytest.mark.parametrize("fault", [Reply(drop=True), Reply(500, error_body("upstream timeout"))],
                         ids=["connection-reset", "http-500"])
def test_batch_created_but_its_answer_lost_is_adopted_not_paid_twice(
        fake_server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        fault: Reply) -> None:
    """The provider created the batch; the answer never arrived. Before: the SDK's own retry
    of the POST created a second batch of the same lines (2 batches, 16 lines billed for 8)."""
    lose_answers(fake_server, monkeypatch, "_create", [fault])
    jobs = make_jobs(4, samples=2)
    record = tmp_path / "b.json"
    results, stats, teacher = run(batch_cfg(fake_server.url), jobs, record)
    assert_all_ok(results, jobs)
    assert len(fake_server.batch.created) == 1  # one batch on the provider
    assert len(fake_server.batch.lines) == 8  # every line paid for once
    assert stored_inputs(fake_server) == 1 and fake_server.chat_count == 0
    # Asked the provider before creating anything again, found the batch by its tag.
    assert control_calls(fake_server) == ["upload", "create", "list"]
    (bid,) = fake_server.batch.batches
    saved = json.loads(record.read_text())
    assert [b["id"] for b in saved["batches"]] == [bid] and saved["intents"] == []
    assert saved["batches"][0]["tag"] == fake_server.batch.batches[bid]["metadata"]["distill_tag"]
    assert saved["batches"][0]["collected"] and saved["batches"][0]["requests"] == 8
    assert {c.extra["batch"] for c in results.values()} == {bid}
    c = teacher.counters
    assert (c["batches_submitted"], c["batches_adopted"], c["lines_first_batch"]) == (1, 1, 8)
    assert stats.failed == 0 and not any("attempts" in r.extra for r in results.values())


@pytest.mark.parametrize("fault", [Reply(drop=True), Reply(500, error_body("overloaded"))],
                         ids=["connection-reset", "http-500"])
def test_batch_create_that_really_failed_is_resubmitted_once(
        fake_server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        fault: Reply) -> None:
    """No batch was created: the provider's list says so, and the same file goes again once."""
    lose_answers(fake_server, monkeypatch, "_create", [fault], acted=False)
    jobs = make_jobs(3)
    record = tmp_path / "b.json"
    results, _, teacher = run(batch_cfg(fake_server.url), jobs, record)
    assert_all_ok(results, jobs)
    assert control_calls(fake_server) == ["upload", "create", "list", "create"]
    assert len(fake_server.batch.created) == 1 and len(fake_server.batch.lines) == 3
    assert stored_inputs(fake_server) == 1  # the stored file is used again, not re-uploaded
    saved = json.loads(record.read_text())
    assert [b["id"] for b in saved["batches"]] == list(fake_server.batch.batches)
    assert saved["intents"] == []
    assert teacher.counters["batches_adopted"] == 0
    assert teacher.counters["batches_submitted"] == 1


def test_upload_stored_but_its_answer_lost_is_found_not_uploaded_again(
        fake_server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the SDK uploaded the file again (2 stored files for one batch)."""
    serve_file_list(fake_server, monkeypatch)
    lose_answers(fake_server, monkeypatch, "_upload", [Reply(drop=True)])
    jobs = make_jobs(3)
    results, _, _ = run(batch_cfg(fake_server.url), jobs, tmp_path / "b.json")
    assert_all_ok(results, jobs)
    assert control_calls(fake_server) == ["upload", "list files", "create"]
    assert stored_inputs(fake_server) == 1
    assert len(fake_server.batch.created) == 1 and len(fake_server.batch.lines) == 3


def test_uploads_whose_answers_are_always_lost_are_bounded(
        fake_server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every upload is stored and its answer lost, and the provider cannot list files: at most
    `max(2, max_retries) + 1` uploads of the same lines (before: that many per attempt of the
    lines, 3 x 3 = 9 here; 7 x 7 = 49 at the default max_retries 6), then error rows."""
    lose_answers(fake_server, monkeypatch, "_upload", [Reply(drop=True)] * 100)
    jobs = make_jobs(3)
    results, stats, _ = run(batch_cfg(fake_server.url, max_retries=2), jobs, tmp_path / "b.json")
    assert stored_inputs(fake_server) == 3
    assert not fake_server.batch.created and not fake_server.batch.lines
    assert set(results) == {(j.key, 0) for j in jobs} and stats.failed == 3
    assert all(c.error_kind == "batch" and "upload" in c.error for c in results.values())


def test_create_unconfirmed_while_batches_cannot_be_listed_then_rerun_adopts_it(
        fake_server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The create's answer is lost and the provider's batch list is down: nothing is created
    again (error rows, the intent kept in the record); the rerun finds the batch by its tag."""
    lose_answers(fake_server, monkeypatch, "_create", [Reply(drop=True)])
    real_dispatch = fake_server.batch.dispatch
    listing = {"up": False}

    def dispatch(req: Request) -> Reply | None:
        if req.method == "GET" and req.path.rstrip("/") == "/v1/batches" and not listing["up"]:
            return Reply(503, error_body("list unavailable"))
        return real_dispatch(req)

    monkeypatch.setattr(fake_server.batch, "dispatch", dispatch)
    jobs = make_jobs(3)
    record = tmp_path / "b.json"
    results, stats, _ = run(batch_cfg(fake_server.url), jobs, record)
    assert len(fake_server.batch.created) == 1 and stats.failed == 3
    assert all(c.error_kind == "batch" and "unconfirmed" in c.error for c in results.values())
    saved = json.loads(record.read_text())
    assert saved["batches"] == [] and len(saved["intents"]) == 1

    listing["up"] = True
    again, stats2, teacher = run(batch_cfg(fake_server.url), jobs, record)
    assert_all_ok(again, jobs)
    assert len(fake_server.batch.created) == 1 and len(fake_server.batch.lines) == 3
    assert teacher.counters["batches_resumed"] == 1 and stats2.failed == 0
    saved = json.loads(record.read_text())
    assert [b["id"] for b in saved["batches"]] == list(fake_server.batch.batches)


# failed lines ----------------------------------------------------------------------------------
def flaky_lines(fail: set[str], times: int, fault: Reply) -> Any:
    """Lines for prompts in `fail` get `fault` the first `times` times."""
    seen: dict[str, int] = {}

    def handler(req: Request) -> Reply:
        i = seen.get(req.prompt, 0)
        seen[req.prompt] = i + 1
        if req.prompt in fail and i < times:
            return fault
        return ok(req)

    return handler


def test_failed_lines_are_retried_in_a_follow_up_batch(fake_server: FakeServer,
                                                      tmp_path: Path) -> None:
    fake_server.handler = flaky_lines({"q1", "q4"}, 1, Reply(500, error_body("overloaded")))
    jobs = make_jobs(6)
    results, stats, teacher = run(batch_cfg(fake_server.url), jobs, tmp_path / "b.json")
    assert_all_ok(results, jobs)
    assert len(fake_server.batch.created) == 2
    retried = [x["body"]["messages"][0]["content"] for x in batch_lines(fake_server, 1)]
    assert sorted(retried) == ["q1", "q4"]  # only the failed lines, once more
    assert results[("q1", 0)].extra["attempts"] == 2 and "attempts" not in results[("q0", 0)].extra
    assert teacher.counters["lines_failed"] == 2 and stats.failed == 0


def test_failed_lines_retried_online_at_the_online_price(fake_server: FakeServer,
                                                        tmp_path: Path) -> None:
    fake_server.handler = flaky_lines({"q2"}, 1, Reply(503, error_body("busy")))
    cfg = batch_cfg(fake_server.url, batch_retry="online")
    jobs = make_jobs(4)
    results, stats, _ = run(cfg, jobs, tmp_path / "b.json")
    assert_all_ok(results, jobs)
    assert len(fake_server.batch.created) == 1 and fake_server.chat_count == 1
    assert fake_server.chat_requests()[0].prompt == "q2"
    assert "price_factor" not in results[("q2", 0)].extra
    full = [results[(f"q{i}", 0)] for i in range(4)]
    expected = sum((c.prompt_tokens * 2.0 + c.completion_tokens * 8.0) / 1e6
                   * c.extra.get("price_factor", 1.0) for c in full)
    assert stats.cost_usd == pytest.approx(expected)


def test_retries_are_bounded_and_bad_requests_not_retried(fake_server: FakeServer,
                                                          tmp_path: Path) -> None:
    def handler(req: Request) -> Reply:
        if req.prompt == "q0":
            return Reply(500, error_body("always down"))
        if req.prompt == "q1":
            return Reply(400, error_body("bad messages", type_="invalid_request_error"))
        if req.prompt == "q2":  # empty content: a content retry, resampled with a new seed
            return Reply(body={"model": "m", "choices": [{"index": 0, "finish_reason": "stop",
                                                          "message": {"content": ""}}]})
        return ok(req)

    fake_server.handler = handler
    cfg = batch_cfg(fake_server.url, max_retries=2, batch_follow_ups=2)  # every retry in batch
    results, stats, _ = run(cfg, make_jobs(4), tmp_path / "b.json")
    assert results[("q3", 0)].error is None
    assert "always down" in results[("q0", 0)].error and "gave up after 3" in results[
        ("q0", 0)].error
    assert results[("q1", 0)].error.startswith("HTTP 400: bad messages")
    assert results[("q2", 0)].error == "empty content (gave up after 3 attempts)"
    assert [results[(f"q{i}", 0)].error_kind for i in range(4)] == [
        "server", "bad_request", "empty", None]
    assert len(fake_server.batch.created) == 3  # the first and two follow-ups
    sent = [r.prompt for r in fake_server.batch.lines]
    assert sent.count("q0") == 3 and sent.count("q1") == 1 and sent.count("q3") == 1
    seeds = [r.body["seed"] for r in fake_server.batch.lines if r.prompt == "q2"]
    assert len(set(seeds)) == 3
    assert stats.failed == 3 and fake_server.chat_count == 0


# follow-up batches, then online (#27) -------------------------------------------------------
def batch_only_failures(fail: set[str]) -> Any:
    """Lines for prompts in `fail` fail on every batch attempt (a 500 line) and succeed online
    (the fake server runs batch lines with no headers; online requests carry them)."""
    def handler(req: Request) -> Reply:
        if req.prompt in fail and not req.headers:
            return Reply(500, error_body("batch worker lost"))
        return ok(req)

    return handler


def sent_per_line(server: FakeServer) -> dict[str, int]:
    """How many times each prompt was run (and billed), in batches and online together."""
    out: dict[str, int] = {}
    for req in [*server.batch.lines, *server.chat_requests()]:
        out[req.prompt] = out.get(req.prompt, 0) + 1
    return out


FAILING = {f"q{i}" for i in range(0, 200, 20)}  # 5% of 200
"""The measured case: 10 of 200 lines fail in every batch; before #27 (`batch_retry: batch`,
max_retries 6) that made 7 batches, 260 batch lines and 10 error rows."""


@pytest.mark.parametrize(("follow_ups", "batches"), [(None, 2), (0, 1), (3, 4)])
def test_failed_lines_go_online_after_the_follow_up_batches(
        fake_server: FakeServer, tmp_path: Path, follow_ups: int | None, batches: int) -> None:
    fake_server.handler = batch_only_failures(FAILING)
    kw = {} if follow_ups is None else {"batch_follow_ups": follow_ups}
    cfg = batch_cfg(fake_server.url, max_retries=6, **kw)  # default: one follow-up batch
    jobs = make_jobs(200)
    results, stats, teacher = run(cfg, jobs, tmp_path / "b.json")
    assert_all_ok(results, jobs)  # every seed has a row, none an error
    assert len(fake_server.batch.created) == batches == teacher.counters["batches_submitted"]
    assert [len(batch_lines(fake_server, i)) for i in range(batches)] == [200] + [10] * (
        batches - 1)
    assert sorted(r.prompt for r in fake_server.chat_requests()) == sorted(FAILING)
    # No completed line is sent again; a failing one runs once per batch, then once online.
    assert sent_per_line(fake_server) == {
        j.key: batches + 1 if j.key in FAILING else 1 for j in jobs}
    c = teacher.counters
    routes = {k: c[k] for k in ("lines_first_batch", "lines_follow_up", "lines_online",
                                "lines_resumed", "lines_failed", "lines_expired")}
    assert routes == {"lines_first_batch": 200, "lines_follow_up": 10 * (batches - 1),
                      "lines_online": 10, "lines_resumed": 0, "lines_failed": 10 * batches,
                      "lines_expired": 0}
    sends = c["lines_first_batch"] + c["lines_follow_up"] + c["lines_online"]
    assert sends == len(fake_server.batch.lines) + fake_server.chat_count == 200 + 10 * batches
    assert sends - c["lines_failed"] == len(results) == stats.sent
    assert teacher.manifest_stats() == {"batch": c}
    online = results[("q20", 0)]
    assert "batch" not in online.extra and "price_factor" not in online.extra  # full price
    assert results[("q1", 0)].extra["price_factor"] == 0.5


def test_batch_retry_online_is_zero_follow_ups() -> None:
    assert BatchTeacher(batch_cfg("http://localhost:1/v1", batch_retry="online")).follow_ups == 0
    assert BatchTeacher(batch_cfg("http://localhost:1/v1")).follow_ups == 1
    with pytest.raises(ValueError, match="batch_retry: online means batch_follow_ups: 0"):
        batch_cfg("http://localhost:1/v1", batch_retry="online", batch_follow_ups=2)


def test_rerun_polls_in_flight_follow_up_then_goes_online(fake_server: FakeServer,
                                                          tmp_path: Path) -> None:
    """A process submitted the first batch and its follow-up, then died: the rerun polls the
    follow-up (submits nothing), and its lines that fail again go online: two batches spent."""
    fail = {"q1", "q3"}
    fake_server.handler = batch_only_failures(fail)
    cfg = batch_cfg(fake_server.url)
    jobs = make_jobs(5)
    record_path = tmp_path / "b.json"
    first = [make_line(cfg, "openai", j, 0) for j in jobs]
    follow = [x for x in first if x.job.key in fail]
    from openai import OpenAI

    client = OpenAI(base_url=fake_server.url, api_key="EMPTY")
    record = BatchRecord(record_path)
    for i, lines in enumerate((first, follow)):
        up = client.files.create(file=("b.jsonl", b"".join(x.data for x in lines),
                                       "application/jsonl"), purpose="batch")
        intent = record.intend(up.id, [x.custom_id for x in lines])
        b = client.batches.create(input_file_id=up.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"distill_tag": intent["tag"]})
        rec = record.add(b.id, intent, b.status)
        if i == 0:
            record.mark(rec, status="completed", collected=True)  # its good lines: cached
    client.close()
    cache = ResponseCache(tmp_path / "cache.sqlite")
    for x in first:
        if x.job.key not in fail:
            cache.put(cache_key("openai", "fake-model", x.job.messages, x.job.params, 0,
                                x.job.response_format), Completion(text=f"earlier {x.job.key}"))
    results, stats, teacher = run(cfg, jobs, record_path, cache)
    cache.close()
    assert_all_ok(results, jobs)
    assert stats.cached == 3 and len(fake_server.batch.created) == 2  # nothing submitted
    assert sorted(r.prompt for r in fake_server.chat_requests()) == ["q1", "q3"]
    assert sent_per_line(fake_server) == {"q0": 1, "q1": 3, "q2": 1, "q3": 3, "q4": 1}
    c = teacher.counters
    assert (c["batches_resumed"], c["lines_resumed"], c["batches_submitted"]) == (1, 2, 0)
    assert (c["lines_first_batch"], c["lines_follow_up"], c["lines_online"]) == (0, 0, 2)


@pytest.mark.parametrize("outcome", ["expired", "cancelled"])
def test_expired_or_cancelled_batch_resubmits_only_what_is_missing(
        fake_server: FakeServer, tmp_path: Path, outcome: str) -> None:
    fake_server.batch.plans = [BatchPlan(outcome=outcome, after=0.1, done_fraction=0.5)]
    jobs = make_jobs(10)
    results, stats, teacher = run(batch_cfg(fake_server.url, max_retries=0), jobs,
                                  tmp_path / "b.json")
    assert_all_ok(results, jobs)  # max_retries 0: resubmitting the missing is no retry
    assert len(fake_server.batch.created) == 2
    first_done = {r.prompt for r in fake_server.batch.lines[:5]}
    second = {x["body"]["messages"][0]["content"] for x in batch_lines(fake_server, 1)}
    assert len(second) == 5 and not second & first_done
    assert len(fake_server.batch.lines) == 10  # nothing ran (or was paid for) twice
    assert teacher.counters["lines_expired"] == 5


def test_failed_batch_is_retried_then_ends_as_error_rows(fake_server: FakeServer,
                                                         tmp_path: Path) -> None:
    err = [{"code": "invalid_model", "message": "model not found", "param": None, "line": None}]
    fake_server.batch.default = BatchPlan(outcome="failed", errors=err)
    results, _, _ = run(batch_cfg(fake_server.url, max_retries=1), make_jobs(2),
                        tmp_path / "b.json")
    assert len(fake_server.batch.created) == 2 and not fake_server.batch.lines
    assert all(c.error == "batch failed: invalid_model: model not found (gave up after 2 "
               "attempts)" for c in results.values())


# splitting, budget, estimate, offline file ----------------------------------------------------
def test_large_jobs_split_by_max_requests(fake_server: FakeServer, tmp_path: Path) -> None:
    jobs = make_jobs(5, samples=2)
    results, _, teacher = run(batch_cfg(fake_server.url, batch_max_requests=4), jobs,
                              tmp_path / "b.json")
    assert_all_ok(results, jobs)
    assert [len(batch_lines(fake_server, i)) for i in range(3)] == [4, 4, 2]
    assert teacher.counters["batches_submitted"] == 3
    saved = json.loads((tmp_path / "b.json").read_text())["batches"]
    assert [b["requests"] for b in saved] == [4, 4, 2]


def test_split_lines_by_bytes_and_count() -> None:
    cfg = batch_cfg("http://localhost:1/v1")
    lines = [make_line(cfg, "openai", j, 0) for j in make_jobs(7)]
    size = len(lines[0].data)
    assert [len(c) for c in split_lines(lines, 100, 3 * size)] == [3, 3, 1]
    assert [len(c) for c in split_lines(lines, 2, 10**9)] == [2, 2, 2, 1]
    assert [len(c) for c in split_lines(lines, 100, 1)] == [1] * 7  # an oversized line alone
    assert sum(len(c) for c in split_lines(lines, 3, 2 * size)) == 7


def test_budget_caps_what_is_submitted(fake_server: FakeServer, tmp_path: Path) -> None:
    # Worst case per line at the batch price: (~5 prompt * 2 + 16 * 8) / 1e6 / 2 ≈ 6.9e-5.
    cfg = batch_cfg(fake_server.url, max_cost_usd=2.5e-4)
    jobs = make_jobs(8)
    results, stats, _ = run(cfg, jobs, tmp_path / "b.json")
    sent = len(fake_server.batch.lines)
    assert 3 <= sent < 8
    budget_rows = [c for c in results.values() if c.error_kind == "budget"]
    assert all(c.error.startswith("budget: max_cost_usd") for c in budget_rows)
    assert len(budget_rows) + sent == 8 and stats.budget_stopped
    assert stats.cost_usd <= 2.5e-4


def test_dry_run_estimate_shows_the_batch_price() -> None:
    jobs = make_jobs(10, samples=2)
    online = estimate(batch_cfg("http://localhost:1/v1", batch=False), jobs)
    batched = estimate(batch_cfg("http://localhost:1/v1", batch_max_requests=8), jobs)
    assert batched["requests"] == 20 and batched["batches"] == 3
    assert batched["est_cost_usd"] == pytest.approx(0.5 * batched["est_cost_usd_online"])
    assert batched["est_cost_usd_online"] == pytest.approx(online["est_cost_usd_if_no_n"])
    assert batched["batch_bytes"] > 0 and "requests_if_no_n" not in batched


def test_batch_jsonl_written_for_offline_runs(tmp_path: Path) -> None:
    """The file `vllm run-batch -i` takes: the same lines the Batch API gets."""
    cfg = batch_cfg("http://localhost:1/v1", batch_max_requests=3)
    paths = write_batch_jsonl(cfg, make_jobs(2, samples=2), tmp_path / "in.jsonl")
    assert [p.name for p in paths] == ["in.jsonl", "in.1.jsonl"]
    lines = [json.loads(x) for p in paths for x in p.read_text().splitlines()]
    assert len(lines) == 4 and {x["url"] for x in lines} == {"/v1/chat/completions"}
    assert all(set(x) == {"custom_id", "method", "url", "body"} for x in lines)


def test_batch_needs_the_openai_backend() -> None:
    with pytest.raises(ValueError, match="batch: true needs backend: openai"):
        TeacherConfig(backend="vllm", model="m", batch=True)


def test_offline_batch_write_run_load_then_generate_replays(fake_server: FakeServer,
                                                           tmp_path: Path) -> None:
    """write → an offline runner (vLLM run-batch; simulated here) → load → the generate stage
    sends only the lines the runner failed."""
    from distill.generate.batch_offline import load, write
    from distill.pipeline import run_stage
    from distill.records import RunDir, read_jsonl

    cfg = generate_config(tmp_path, fake_server.url, n=4)
    cfg.teacher.batch = False
    (path,) = write(cfg, tmp_path / "batch.jsonl")
    out = []
    for i, raw in enumerate(path.read_text().splitlines()):
        line = json.loads(raw)
        req = Request(method="POST", path=line["url"], headers={}, body=line["body"], index=i)
        if i == 0:  # the runner failed this one
            out.append({"id": "x", "custom_id": line["custom_id"], "response": {
                "status_code": 500, "body": error_body("oom")}, "error": None})
            continue
        out.append({"id": f"r{i}", "custom_id": line["custom_id"],
                    "response": {"status_code": 200, "body": ok(req).body}, "error": None})
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(x) + "\n" for x in out))

    run_dir = RunDir(tmp_path / "run")
    cache = ResponseCache(run_dir.cache)
    assert load(cfg, results, cache) == {"cached": 7, "failed": 1, "unknown": 0}
    cache.close()
    entry = run_stage("generate", cfg, run_dir)
    assert entry["status"] == "done" and entry["rows"] == 8 and entry["errors"] == 0
    assert fake_server.chat_count == 1 and entry["cached"] == 7
    rows = read_jsonl(run_dir.stage("generate") / "generations.jsonl")
    assert sum(r["response"].startswith("echo: What is") for r in rows) == 8
