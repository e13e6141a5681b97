"""The filter stage end to end: every row keeps or drops with a reason, the funnel adds up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distill.config import PipelineConfig
from distill.filter.chain import filter_rows

GSM8K = next((p for p in (Path(__file__).resolve().parents[1] / "data" / "gsm8k",
                          Path("/work/shared/data/gsm8k")) if (p / "train.jsonl").exists()), None)


def config(filters: dict[str, Any], task: str = "cot") -> PipelineConfig:
    return PipelineConfig.model_validate({"name": "t", "seeds": {"path": "x"},
                                          "generate": {"task": task}, "filter": filters})


def gen(rid: str, seed: str, response: str, gold: str | None = None, **extra: Any
        ) -> dict[str, Any]:
    return {"id": rid, "seed_id": seed, "sample": int(rid[-1]), "question": f"Question {seed}?",
            "gold": gold, "response": response, "finish_reason": "stop", "error": None} | extra


ROWS = [
    gen("a0", "a", "3 + 4 = 7. The answer is 7.", "7"),
    gen("a1", "a", "We add: 3 + 4 = 7. The answer is 7.", "7"),
    gen("a2", "a", "3 + 4 = 8. The answer is 8.", "7"),
    gen("a3", "a", "3 + 4 = 7. The ans", "7", finish_reason="length"),
    gen("b0", "b", "2 * 5 = 10. The answer is 10."),
    gen("b1", "b", "Two fives: 2 * 5 = 10. Answer: 10"),
    gen("b2", "b", "5 + 7 = 12. The answer is 12."),
    gen("c0", "c", "", error="TimeoutError: read timed out"),
    gen("c1", "c", "I'm sorry, but I can't help with that."),
    gen("c2", "c", "loop " * 200),
]

ALL_ON = {"heuristics": {}, "verify": {}, "consistency": {}, "dedup": {"exact": True},
          "max_per_seed": 1}


def test_every_row_gets_keep_reason_scores_and_the_funnel_adds_up() -> None:
    out, funnel = filter_rows([dict(r) for r in ROWS], config(ALL_ON))
    assert len(out) == len(ROWS)
    reasons = {r["id"]: r["drop_reason"] for r in out}
    assert reasons == {
        "a0": None,
        "a1": "max_per_seed: over max_per_seed",
        "a2": "verify: wrong answer",
        "a3": "verify: truncated (finish_reason=length)",
        "b0": None,
        "b1": "max_per_seed: over max_per_seed",
        "b2": "consistency: not the majority answer",
        "c0": "errors: teacher error (TimeoutError)",
        "c1": "heuristics: refusal",
        "c2": "heuristics: repetitive",
    }
    for r in out:
        assert set(r) >= {"keep", "drop_reason", "scores", "cluster_id"}
        assert r["keep"] == (r["drop_reason"] is None)
    assert [f["name"] for f in funnel["filters"]] == [
        "errors", "heuristics", "verify", "consistency", "dedup.exact", "max_per_seed"]
    assert funnel["in"] == 10 and funnel["out"] == 2
    steps = funnel["filters"]
    assert steps[0]["in"] == 10
    for before, after in zip(steps, steps[1:], strict=False):
        assert after["in"] == before["out"]
        assert before["in"] - before["out"] == sum(before["dropped"].values())
    assert steps[-1]["out"] == funnel["out"]
    b0 = next(r for r in out if r["id"] == "b0")
    assert b0["pseudo_label"] == "10" and b0["gold"] is None
    assert b0["scores"]["agreement"] == round(2 / 3, 4)
    json.dumps(out), json.dumps(funnel)  # both go to jsonl / json files as they are


def test_input_rows_are_not_mutated() -> None:
    rows = [dict(r) for r in ROWS]
    before = json.dumps(rows, sort_keys=True)
    filter_rows(rows, config(ALL_ON))
    assert json.dumps(rows, sort_keys=True) == before


def test_max_per_seed_keeps_the_best_scored_rows() -> None:
    rows = [gen("a0", "a", "A long-winded path: 3 + 4 = 7. The answer is 7.", "7"),
            gen("a1", "a", "3 + 4 = 7. The answer is 7.", "7"),
            gen("a2", "a", "3 + 4 = 8. The answer is 8.", "7")]
    out, _ = filter_rows(rows, config({"verify": None, "dedup": None, "max_per_seed": 1}))
    # Verify is off, so nothing is "verified": the shorter correct-looking rows win by length.
    assert [r["keep"] for r in out] == [False, True, False]
    out, _ = filter_rows(rows, config({"verify": {}, "dedup": None, "max_per_seed": 1}))
    assert [r["keep"] for r in out] == [False, True, False]
    assert out[2]["drop_reason"] == "verify: wrong answer"


def test_bring_your_own_rows_with_only_question_and_response() -> None:
    rows = [{"question": "What is 6 * 7?", "response": "6 * 7 = 42. The answer is 42."},
            {"question": "What is 6 * 7?", "response": "6 * 7 = 42. The answer is 42."},
            {"question": "Name a colour.", "response": "Blue."},
            {"question": "What is 2 + 2?", "rationale": "2 + 2 = 4", "answer": "4", "gold": 4}]
    out, funnel = filter_rows(rows, config({"heuristics": {}, "verify": {}, "consistency": {},
                                            "dedup": {"exact": True}}))
    assert [r["id"] for r in out] == ["0", "1", "2", "3"]
    assert [r["drop_reason"] for r in out] == [
        None, "dedup.exact: exact duplicate", "verify: truncated (no final answer)", None]
    assert out[0]["answer"] == "42" and out[1]["cluster_id"] == "0"
    assert out[3]["scores"]["verified"] is True
    assert funnel["out"] == 2


def test_instruction_data_is_not_asked_for_answers() -> None:
    rows = [{"id": "i0", "question": "Write a haiku about rain.",
             "response": "Soft rain on the roof\nwhispers to the sleeping town\npuddles"}]
    out, _ = filter_rows(rows, config({"verify": {}}, task="instruct"))
    assert out[0]["keep"]


def test_everything_off_keeps_everything_but_errors() -> None:
    out, funnel = filter_rows([dict(r) for r in ROWS], config({"verify": None, "dedup": None}))
    assert [r["keep"] for r in out] == [r["error"] is None for r in ROWS]
    assert [f["name"] for f in funnel["filters"]] == ["errors"]
    empty = filter_rows([], config({}))[1]
    assert (empty["in"], empty["out"]) == (0, 0)
    assert [(f["name"], f["in"], f["out"], f["dropped"]) for f in empty["filters"]] == [
        ("errors", 0, 0, {}), ("verify", 0, 0, {}), ("dedup.exact", 0, 0, {})]


@pytest.mark.skipif(GSM8K is None, reason="GSM8K jsonl files not found")
def test_gsm8k_solutions_as_generations_survive_the_default_filters() -> None:
    assert GSM8K is not None
    with open(GSM8K / "train.jsonl") as fh:
        seeds = [json.loads(line) for _, line in zip(range(300), fh, strict=False)]
    rows = [{"id": f"g{i}#0", "seed_id": f"g{i}", "question": s["question"],
             "gold": s["answer"], "response": s["answer"], "finish_reason": "stop"}
            for i, s in enumerate(seeds)]
    out, funnel = filter_rows(rows, config({"heuristics": {}, "verify": {}, "dedup": {
        "exact": True, "near": {"ngram": 3, "threshold": 0.7}}}))
    assert all(r["scores"]["verified"] for r in out)
    # The few drops are solutions whose last equation is not the final answer (unit changes,
    # "20 = A"-style algebra): the faithfulness check, documented in filter/verify.py; and
    # a gold solution whose step is wrong as written ("192*100=$1920"): the arithmetic check.
    assert funnel["out"] >= 0.97 * len(rows)
    assert {r["drop_reason"] for r in out if not r["keep"]} <= {
        "verify: unfaithful (last equation differs from the answer)",
        "verify: wrong arithmetic in a step"}
