"""LLM-as-judge through the real engine and cache, with a fake teacher (no network)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import distill.filter.judge as judge_module
from distill.config import PipelineConfig
from distill.filter.chain import filter_rows
from distill.filter.judge import parse_judge_score
from distill.teachers.base import Completion, Job
from distill.teachers.cache import ResponseCache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # fakeserver


@pytest.mark.parametrize(("reply", "scale", "score"), [
    ("The steps are right.\nScore: 8/10", 10, 8.0),
    ("8", 10, 8.0),
    ("**8**", 10, 8.0),
    ('{"score": 8, "reason": "fine"}', 10, 8.0),
    ("```json\n{\"rating\": \"4/5\"}\n```", 10, 8.0),
    ("rating: 4 out of 5", 10, 8.0),
    ("Rating: 4.5/5", 10, 9.0),
    ("I would give this a score of 7.", 10, 7.0),
    ("Grade the solution from 1 to 10.\nScore: 6/10", 10, 6.0),  # the verdict comes last
    ("<think>maybe score 3</think>Final score: **9**", 10, 9.0),
    ("Score: 4", 5, 4.0),
    ("Score: 8/10", 5, 4.0),
    ("Score: 85", 10, None),  # out of range: not a score on this scale
    ("A fine solution, well explained.", 10, None),
    ("", 10, None),
])
def test_parse_judge_score(reply: str, scale: float, score: float | None) -> None:
    assert parse_judge_score(reply, scale) == score


class FakeJudge:
    """A Teacher: replies from the response under review, and records what it was asked."""

    backend = "fake"
    model_id = "fake-judge"

    def __init__(self) -> None:
        self.prompts: list[str] = []

    async def stream(self, jobs: Sequence[Job]) -> AsyncIterator[tuple[Job, int, Completion]]:
        for job in jobs:
            for s in job.samples:
                prompt = job.messages[-1]["content"]
                self.prompts.append(prompt)
                yield job, s, self.reply(prompt)

    @staticmethod
    def reply(prompt: str) -> Completion:
        if "[crash]" in prompt:
            return Completion(error="HTTPError: 500 from judge")
        if "[mumble]" in prompt:
            return Completion(text="Looks fine to me.", finish_reason="stop")
        if "[weak]" in prompt:
            return Completion(text="Skips a step.\nScore: 4/10", finish_reason="stop")
        return Completion(text='{"score": 9}', finish_reason="stop")

    async def aclose(self) -> None:
        return None


def config(**judge: Any) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "name": "judge-test", "root": str(ROOT), "seeds": {"path": "unused.jsonl"},
        "filter": {"verify": None, "dedup": None, "judge": judge},
    })


def rows() -> list[dict[str, Any]]:
    texts = ["3 + 4 = 7. The answer is 7.", "[weak] It is 7.", "[crash] 7", "[mumble] 7"]
    return [{"id": f"r{i}", "seed_id": f"s{i}", "question": "Tom has 3 apples and buys 4. "
             "How many?", "gold": "...#### 7", "response": t} for i, t in enumerate(texts)]


def test_judge_scores_drops_and_reasons(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeJudge()
    monkeypatch.setattr(judge_module, "make_teacher", lambda cfg: fake)
    out, funnel = filter_rows(rows(), config(threshold=7), ResponseCache(tmp_path / "c.sqlite"))
    assert [r["keep"] for r in out] == [True, False, False, False]
    assert [r["drop_reason"] for r in out] == [
        None, "judge: low judge score", "judge: judge call failed", "judge: judge gave no score"]
    assert [r["scores"]["judge"] for r in out] == [9.0, 4.0, None, None]
    assert "500" in out[2]["scores"]["judge_error"]
    judge_step = next(f for f in funnel["filters"] if f["name"] == "judge")
    assert judge_step["in"] == 4 and judge_step["out"] == 1
    assert judge_step["dropped"] == {"low judge score": 1, "judge call failed": 1,
                                     "judge gave no score": 1}
    # The rubric template saw the question, the response and the gold answer (from "#### 7").
    assert "Tom has 3 apples" in fake.prompts[0] and "3 + 4 = 7" in fake.prompts[0]
    assert "Reference answer: 7" in fake.prompts[0]


def test_judge_replies_are_cached_and_failures_retried(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "c.sqlite")
    first, second = FakeJudge(), FakeJudge()
    monkeypatch.setattr(judge_module, "make_teacher", lambda cfg: first)
    filter_rows(rows(), config(), cache)
    assert len(first.prompts) == 4
    monkeypatch.setattr(judge_module, "make_teacher", lambda cfg: second)
    out, _ = filter_rows(rows(), config(), cache)
    assert len(second.prompts) == 1  # only the failed call goes out again
    assert out[0]["scores"]["judge"] == 9.0


def test_judge_uses_its_own_teacher_and_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    class OutOfTen(FakeJudge):
        @staticmethod
        def reply(prompt: str) -> Completion:
            return Completion(text="Score: 4/10" if "[weak]" in prompt else "Score: 9/10")

    def make(cfg: Any) -> FakeJudge:
        seen.append(cfg)
        return OutOfTen()

    monkeypatch.setattr(judge_module, "make_teacher", make)
    cfg = config(scale=5, threshold=3, teacher={"backend": "openai", "model": "judge-model"})
    out, _ = filter_rows(rows()[:2], cfg, None)
    assert seen[0].model == "judge-model"
    assert [r["scores"]["judge"] for r in out] == [4.5, 2.0]  # rescaled onto the 5-point scale
    assert [r["keep"] for r in out] == [True, False]


def test_gold_is_optional_in_the_rubric(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeJudge()
    monkeypatch.setattr(judge_module, "make_teacher", lambda cfg: fake)
    r = rows()[0] | {"gold": None}
    out, _ = filter_rows([r], config(), None)
    assert out[0]["keep"] and "Reference answer" not in fake.prompts[0]


# filter.judge.structured: a real OpenAITeacher against the loopback server -----------------------
def _structured_config(url: str, structured: bool = True) -> PipelineConfig:
    return config(structured=structured, threshold=7, teacher={
        "backend": "openai", "model": "judge-model", "base_url": url, "api_key_env": None,
        "max_retries": 1, "max_concurrency": 2, "timeout_s": 5.0})


def test_structured_judge_sends_the_schema_and_reads_the_parsed_score(tmp_path: Path) -> None:
    from fakeserver import FakeServer, Reply, Request, chat_body

    def handler(req: Request) -> Reply:
        prompt = req.prompt
        # What a schema-honouring server returns (and one that ignores the schema).
        if "[weak]" in prompt:
            text = '{"score": 4}'
        elif "[crash]" in prompt:
            text = "Score: 9/10"  # ignores the schema: invalid, retried, then a failed call
        elif "[mumble]" in prompt:
            text = '{"score": 85}'  # valid JSON, out of range on the 10-point scale
        else:
            text = '{"score": 8.5}'
        return Reply(body=chat_body(req, texts=[text]))

    with FakeServer(handler) as server:
        out, _ = filter_rows(rows(), _structured_config(server.url),
                             ResponseCache(tmp_path / "c.sqlite"))
        sent = server.chat_requests()
    fmt = sent[0].body["response_format"]
    assert fmt == {"type": "json_schema", "json_schema": {
        "name": "judge_score", "strict": True, "schema": {
            "type": "object", "properties": {"score": {"type": "number"}},
            "required": ["score"], "additionalProperties": False}}}
    assert all(r.body["response_format"] == fmt for r in sent)
    assert 'Answer with JSON only: {"score": N}, N your score from 0 to 10.' in sent[0].prompt
    assert [r["scores"]["judge"] for r in out] == [8.5, 4.0, None, None]
    assert [r["drop_reason"] for r in out] == [
        None, "judge: low judge score", "judge: judge call failed", "judge: judge gave no score"]
    assert out[2]["scores"]["judge_error"].startswith("invalid JSON")
    assert sum("[crash]" in r.prompt for r in sent) == 2  # max_retries 1: sent twice


def test_structured_judge_falls_back_to_the_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that returns no parsed value (a fake here, like the local backends): the
    score is read from the text, and the job still carried the response_format."""
    fake = FakeJudge()
    seen: list[Job] = []
    original = fake.stream

    def stream(jobs: Sequence[Job]) -> AsyncIterator[tuple[Job, int, Completion]]:
        seen.extend(jobs)
        return original(jobs)

    monkeypatch.setattr(fake, "stream", stream)
    monkeypatch.setattr(judge_module, "make_teacher", lambda cfg: fake)
    out, _ = filter_rows(rows()[:2], config(structured=True, threshold=7), None)
    assert [r["scores"]["judge"] for r in out] == [9.0, 4.0]
    assert all(j.response_format is not None
               and j.response_format["json_schema"]["name"] == "judge_score" for j in seen)


def test_structured_score_prefers_the_parsed_object() -> None:
    from distill.filter.judge import structured_score

    comp = Completion(text="Score: 2/10", extra={"parsed": {"score": 7}})
    assert structured_score(comp, 10) == 7.0
    assert structured_score(Completion(text="Score: 2/10"), 10) == 2.0
    assert structured_score(Completion(text="x", extra={"parsed": {"score": 11}}), 10) is None
    assert structured_score(Completion(text="", extra={"parsed": {"score": True}}), 10) is None


def test_unstructured_judge_sends_no_response_format(tmp_path: Path) -> None:
    from fakeserver import FakeServer, Reply, chat_body

    with FakeServer(lambda req: Reply(body=chat_body(req, texts=["Score: 9/10"]))) as server:
        out, _ = filter_rows(rows()[:1], _structured_config(server.url, False), None)
        sent = server.chat_requests()
    assert "response_format" not in sent[0].body and "JSON only" not in sent[0].prompt
    assert out[0]["scores"]["judge"] == 9.0
