"""Structured outputs (`generate.response_format`): sent as a json_schema response_format,
validated on receipt, retried when invalid, parsed into the row.

The loopback server answers valid, invalid and truncated JSON; each test checks what ends in the
rows and how many requests it took.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakeserver_fixture  # noqa: E402
from fakeserver import FakeServer, Reply, Request, chat_body  # noqa: E402

from distill.config import ConfigError, PipelineConfig, TeacherConfig  # noqa: E402
from distill.teachers.base import Job, SamplingParams  # noqa: E402
from distill.teachers.cache import cache_key  # noqa: E402
from distill.teachers.engine import run_jobs  # noqa: E402
from distill.teachers.openai_backend import OpenAITeacher  # noqa: E402
from distill.teachers.structured import response_format, validate  # noqa: E402
from tests.projects import write_sum_project

fake_server = fakeserver_fixture.fake_server

pytestmark = pytest.mark.timeout(60)

SCHEMA = {"type": "object", "properties": {"rationale": {"type": "string"},
                                           "answer": {"type": "integer"}},
          "required": ["rationale", "answer"], "additionalProperties": False}


class Solution(BaseModel):
    """Referenced as "test_structured:Solution" in a config."""

    rationale: str
    answer: int


def teacher(url: str, **kw: Any) -> OpenAITeacher:
    cfg = TeacherConfig(backend="openai", model="fake-model", base_url=url, api_key_env=None,
                        max_concurrency=2, timeout_s=5.0, **({"max_retries": 2} | kw))
    return OpenAITeacher(cfg, backoff_base_s=0.01, backoff_cap_s=0.02)


def jobs(n: int, fmt: dict[str, Any] | None) -> list[Job]:
    params = SamplingParams(max_tokens=32, seed=3)
    return [Job(key=f"q{i}", messages=[{"role": "user", "content": f"q{i}"}], params=params,
                samples=[0], response_format=fmt) for i in range(n)]


def reply(req: Request, text: str, finish: str = "stop") -> Reply:
    return Reply(body=chat_body(req, texts=[text], finish_reason=finish))


VALID = '{"rationale": "2 + 2 = 4", "answer": 4}'


def test_response_format_shapes() -> None:
    fmt = response_format(SCHEMA)
    assert fmt == {"type": "json_schema", "json_schema": {"name": "response", "schema": SCHEMA,
                                                          "strict": True}}
    wrapped = response_format({"name": "math answer!", "schema": SCHEMA, "strict": False})
    assert wrapped["json_schema"]["name"] == "math_answer_" and not wrapped["json_schema"][
        "strict"]
    model = response_format("test_structured:Solution")
    schema = model["json_schema"]["schema"]
    assert model["json_schema"]["name"] == "Solution" and schema["additionalProperties"] is False
    assert set(schema["required"]) == {"rationale", "answer"}
    assert response_format(None) is None
    with pytest.raises(ConfigError, match="cannot import"):
        response_format("no_such_module_xyz:Thing")
    with pytest.raises(ConfigError, match="not a valid JSON schema"):
        response_format({"type": "object", "properties": {"a": {"type": "nope"}}})


def test_validate() -> None:
    fmt = response_format(SCHEMA)
    assert validate(VALID, fmt) == ({"rationale": "2 + 2 = 4", "answer": 4}, None)
    assert validate(f"```json\n{VALID}\n```", fmt)[0] == {"rationale": "2 + 2 = 4", "answer": 4}
    assert validate('{"rationale": "x", "answer": ', fmt)[1].startswith("invalid JSON")
    assert validate('{"rationale": "x", "answer": "four"}', fmt)[1].startswith(
        "schema mismatch at answer")
    assert validate('{"rationale": "x"}', fmt)[1].startswith("schema mismatch at (root)")


def test_valid_json_is_parsed_and_sent_with_the_schema(fake_server: FakeServer) -> None:
    fake_server.handler = lambda req: reply(req, VALID)
    fmt = response_format(SCHEMA)
    results, stats = run_jobs(teacher(fake_server.url), jobs(3, fmt), None, show_progress=False)
    assert stats.failed == 0 and fake_server.chat_count == 3
    assert fake_server.chat_requests()[0].body["response_format"] == fmt
    assert all(c.extra["parsed"] == {"rationale": "2 + 2 = 4", "answer": 4}
               for c in results.values())


def test_invalid_json_is_retried_then_an_error_row(fake_server: FakeServer) -> None:
    seen: dict[str, int] = {}

    def handler(req: Request) -> Reply:
        seen[req.prompt] = seen.get(req.prompt, 0) + 1
        if req.prompt == "q0":  # never valid
            return reply(req, '{"rationale": "x", "answer": "four"}')
        if req.prompt == "q1" and seen["q1"] == 1:  # wrong once, then right
            return reply(req, "The answer is 4.")
        return reply(req, VALID)

    fake_server.handler = handler
    results, stats = run_jobs(teacher(fake_server.url), jobs(3, response_format(SCHEMA)), None,
                              show_progress=False)
    assert results[("q0", 0)].error == ("schema mismatch at answer: 'four' is not of type "
                                        "'integer' (gave up after 3 attempts)")
    assert results[("q1", 0)].error is None and results[("q1", 0)].extra["attempts"] == 2
    assert seen == {"q0": 3, "q1": 2, "q2": 1} and stats.failed == 1
    # The failed attempts were billed, and the error row says so.
    assert results[("q0", 0)].completion_tokens > 0


def test_truncated_json_is_retried_and_named(fake_server: FakeServer) -> None:
    fake_server.handler = lambda req: reply(req, '{"rationale": "a long derivat', "length")
    results, _ = run_jobs(teacher(fake_server.url, max_retries=1),
                          jobs(1, response_format(SCHEMA)), None, show_progress=False)
    err = results[("q0", 0)].error
    assert err.startswith("invalid JSON") and "(cut by max_tokens)" in err
    assert fake_server.chat_count == 2


def test_complete_json_at_the_length_limit_is_kept(fake_server: FakeServer) -> None:
    fake_server.handler = lambda req: reply(req, VALID, "length")
    results, _ = run_jobs(teacher(fake_server.url, on_length="retry"),
                          jobs(1, response_format(SCHEMA)), None, show_progress=False)
    assert results[("q0", 0)].error is None and fake_server.chat_count == 1


def test_free_text_is_not_validated_and_keys_unchanged(fake_server: FakeServer) -> None:
    fake_server.handler = lambda req: reply(req, "not json at all")
    results, _ = run_jobs(teacher(fake_server.url), jobs(1, None), None, show_progress=False)
    assert results[("q0", 0)].error is None and "parsed" not in results[("q0", 0)].extra
    assert "response_format" not in fake_server.chat_requests()[0].body
    job = jobs(1, None)[0]
    plain = cache_key("openai", "m", job.messages, job.params, 0)
    assert plain == cache_key("openai", "m", job.messages, job.params, 0, None)
    assert plain != cache_key("openai", "m", job.messages, job.params, 0,
                              response_format(SCHEMA))


def stage_config(tmp_path: Path, url: str, fmt: Any, batch: bool = False) -> PipelineConfig:
    write_sum_project(tmp_path, 4)
    return PipelineConfig.model_validate({
        "name": "structured", "root": str(tmp_path), "seeds": {"path": "seeds.jsonl"},
        "teacher": {"backend": "openai", "model": "fake-model", "base_url": url,
                    "api_key_env": None, "max_retries": 1, "batch": batch,
                    "batch_poll_s": 0.02},
        "generate": {"prompt": "p.j2", "max_tokens": 32, "response_format": fmt},
    })


def solve(req: Request) -> Reply:
    """Answers "What is i + 1?" in the schema; "What is 3 + 1?" never validates. The served
    model name is more specific than the one asked for."""
    q = req.prompt
    i = int(q.split()[2])
    text = "{nope" if i == 3 else json.dumps({"rationale": f"{i} + 1 = {i + 1}",
                                              "answer": i + 1})
    body = chat_body(req, texts=[text])
    body["model"] = "fake-model-2025-06-01"
    return Reply(body=body)


@pytest.mark.parametrize("batch", [False, True])
def test_generate_rows_carry_parsed_fields_and_served_model(
        fake_server: FakeServer, tmp_path: Path, batch: bool) -> None:
    from distill.pipeline import run_stage
    from distill.records import RunDir, read_jsonl

    fake_server.handler = solve
    cfg = stage_config(tmp_path, fake_server.url, "test_structured:Solution", batch)
    entry = run_stage("generate", cfg, RunDir(tmp_path / "run"))
    assert entry["status"] == "done" and entry["rows"] == 4 and entry["errors"] == 1
    rows = {r["seed_id"]: r for r in read_jsonl(
        tmp_path / "run" / "generate" / "generations.jsonl")}
    assert rows["s1"]["extra"]["parsed"] == {"rationale": "1 + 1 = 2", "answer": 2}
    assert rows["s1"]["answer"] == "2" and rows["s1"]["rationale"] == "1 + 1 = 2"
    assert rows["s3"]["error"].startswith("invalid JSON") and rows["s3"]["response"] is None
    assert rows["s3"]["extra"] == {"parsed": None} and rows["s3"]["teacher_served"] is None
    assert all(rows[f"s{i}"]["teacher_served"] == "fake-model-2025-06-01" for i in range(3))
    assert rows["s1"]["teacher"] == "openai:fake-model"
    sent = fake_server.batch.lines if batch else fake_server.chat_requests()
    assert len(sent) == 5  # s3 once more (max_retries 1)
    assert all(r.body["response_format"]["json_schema"]["name"] == "Solution" for r in sent)
