"""Generation rows: one builder (`records.make_generation_row`) to one schema (`GenerationRow`),
whichever generator made the row: chain of thought, instruct answers, or an imported file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distill.config import PipelineConfig
from distill.generate.cot import build_jobs, generation_row
from distill.generate.imported import imported_generations
from distill.generate.instruct import answer_jobs, answer_row
from distill.records import GENERATION_FIELDS, GenerationRow, make_generation_row
from distill.teachers.base import Completion
from tests.projects import write_sum_project

SOFT = [[("The", -0.1), ("A", -2.3)], [("answer", -0.2), ("sum", -1.9)]]


def config(tmp_path: Path, **generate: Any) -> PipelineConfig:
    write_sum_project(tmp_path, 2)
    return PipelineConfig.model_validate({
        "name": "rows", "root": str(tmp_path), "seeds": {"path": "seeds.jsonl"},
        "teacher": {"backend": "openai", "model": "m", "base_url": "http://localhost:1/v1",
                    "api_key_env": None, "price_in_per_mtok": 1.0, "price_out_per_mtok": 2.0,
                    "top_logprobs": 2},
        "generate": {"prompt": "p.j2", **generate}})


def answered(text: str = "The answer is 2.") -> Completion:
    return Completion(text=text, finish_reason="stop", prompt_tokens=10, completion_tokens=4,
                      latency_s=0.25, top_logprobs=SOFT, token_ids=[5, 6],
                      extra={"served_model": "m-2025"})


def test_the_schema_is_the_column_list() -> None:
    assert GenerationRow.__required_keys__ == set(GENERATION_FIELDS)
    assert {"top_logprobs", "token_ids", "extra"} <= GenerationRow.__optional_keys__


def test_every_generator_gives_the_same_columns(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    seed = {"id": "s0", "question": "What is 1 + 1?", "answer": "2"}
    job = build_jobs(cfg, [seed], samples=1)[0]
    cot = generation_row(cfg, seed, job, 0, answered())
    inst = {"instruction_id": "inst-00000", "text": "Add one and one.", "proposal_round": 0,
            "evolve_round": 0, "evolve_method": None, "parent": None}
    ans = answer_row(cfg, inst, answer_jobs(cfg, [inst])[0], 0, answered("Two."))
    (tmp_path / "mine.jsonl").write_text(json.dumps(
        {"question": "What is 3 + 1?", "response": "The answer is 4.", "note": "kept"}) + "\n")
    imported = imported_generations(config(tmp_path, source="mine.jsonl"))[0]
    for row in (cot, ans, imported):
        assert list(row)[: len(GENERATION_FIELDS)] == list(GENERATION_FIELDS)
    assert (cot["answer"], cot["cost_usd"], cot["teacher_served"]) == ("2", 18e-6, "m-2025")
    assert (imported["answer"], imported["teacher"], imported["id"]) == ("4", "file:mine.jsonl",
                                                                         "row-0#0")
    assert imported["note"] == "kept" and imported["error_kind"] is None


def test_instruct_answers_keep_the_soft_targets(tmp_path: Path) -> None:
    """The instruct row builder dropped `top_logprobs`: a KD run on instruction data had none."""
    cfg = config(tmp_path)
    inst = {"instruction_id": "inst-00000", "text": "Name a prime.", "proposal_round": 1,
            "evolve_round": 0, "evolve_method": None, "parent": None}
    job = answer_jobs(cfg, [inst])[0]
    assert job.params.top_logprobs == 2  # the answers ask for them
    row = answer_row(cfg, inst, job, 0, answered("<think>small</think>Two."))
    assert row["top_logprobs"] == SOFT and row["token_ids"] == [5, 6]
    assert (row["reasoning"], row["rationale"], row["answer"]) == ("small", "Two.", None)
    assert row["messages"] == [{"role": "user", "content": "Name a prime."}]


@pytest.mark.parametrize("kind", ["budget", "missing_logprobs", "timeout"])
def test_a_failed_sample_keeps_no_response_and_says_what_kind(tmp_path: Path,
                                                              kind: Any) -> None:
    cfg = config(tmp_path)
    seed = {"id": "s1", "question": "What is 2 + 1?", "answer": "3"}
    job = build_jobs(cfg, [seed], samples=1)[0]
    comp = Completion.failed(kind, f"{kind}: not sent", prompt_tokens=3)
    row = generation_row(cfg, seed, job, 0, comp)
    assert (row["response"], row["rationale"], row["answer"]) == (None, None, None)
    assert (row["error"], row["error_kind"], row["prompt_tokens"]) == (f"{kind}: not sent",
                                                                       kind, 3)
    assert "top_logprobs" not in row


def test_fields_override_what_the_completion_fills() -> None:
    row = make_generation_row(seed_id="a", sample=2, question="q", gold=None, messages=[],
                              teacher="t", completion=answered(), parsed={"answer": "x"},
                              answer="y", extra={"parsed": {"answer": "y"}})
    assert (row["id"], row["answer"], row["extra"]) == ("a#2", "y", {"parsed": {"answer": "y"}})
