"""Decontamination against evaluation files: each hit names the eval item and the n-gram."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from benchmarks.edits import light_edit
from distill.config import ConfigError, DecontamConfig, PipelineConfig
from distill.filter.chain import filter_rows
from distill.filter.decontam import build_index, decontam_reasons

GSM8K = next((p for p in (Path(__file__).resolve().parents[1] / "data" / "gsm8k",
                          Path("/work/shared/data/gsm8k")) if (p / "train.jsonl").exists()), None)

# Measured by `python benchmarks/dedup.py quality` (issue #16): 10-grams flag 0.15% of GSM8K train
# against GSM8K test and catch 99.4% of lightly edited test questions; 8-grams flag 1.26%.
PROPOSED_NGRAM = 10
PREVIOUS_NGRAM = 8

EVAL = [
    {"question": "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning "
                 "and bakes muffins for her friends every day with four.", "answer": "18"},
    {"question": "What is the capital of France?", "answer": "Paris"},
    {"problem": "A robe takes 2 bolts of blue fiber and half that much white fiber.",
     "answer": "3"},
]


def write_eval(tmp_path: Path, items: list[dict[str, Any]], name: str = "eval.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return str(path)


def row(question: str, response: str = "The answer is 1.") -> dict[str, Any]:
    return {"question": question, "response": response}


def test_copied_eval_question_is_dropped_with_the_item_it_matched(tmp_path: Path) -> None:
    path = write_eval(tmp_path, EVAL)
    rows = [row("JANET'S ducks lay 16 eggs per day!  She eats three for breakfast, how many?"),
            row("Tom's ducks lay 16 eggs per week. How many eggs in a year?")]
    reasons = decontam_reasons(rows, DecontamConfig(against=[path], ngram=8))
    assert reasons == ["contaminated (eval.jsonl)", None]
    hit = rows[0]["scores"]["contamination"]
    assert hit == {"eval_file": path, "eval_index": 0, "field": "question",
                   "ngram": "janet s ducks lay 16 eggs per day"}
    assert "scores" not in rows[1]


def test_short_eval_items_match_whole(tmp_path: Path) -> None:
    path = write_eval(tmp_path, EVAL)
    rows = [row("Quick quiz: what is the capital of France? Answer briefly."),
            row("What is the capital of Spain?")]
    assert decontam_reasons(rows, DecontamConfig(against=[path], ngram=8)) == [
        "contaminated (eval.jsonl)", None]
    assert rows[0]["scores"]["contamination"]["eval_index"] == 1


def test_other_field_names_and_responses(tmp_path: Path) -> None:
    path = write_eval(tmp_path, EVAL)
    leaked = row("Make a robe.", "A robe takes 2 bolts of blue fiber and half that much white.")
    cfg = DecontamConfig(against=[path], ngram=6)
    assert decontam_reasons([dict(leaked)], cfg) == [None]  # responses unchecked by default
    checked = dict(leaked)
    assert decontam_reasons([checked], cfg.model_copy(update={"check_responses": True})) == [
        "contaminated (eval.jsonl)"]
    assert checked["scores"]["contamination"]["field"] == "response"
    assert checked["scores"]["contamination"]["eval_index"] == 2  # found under "problem"


def test_configured_field_and_json_list(tmp_path: Path) -> None:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([{"prompt": "x", "input": "Sum the first ten odd numbers now"}]))
    idx = build_index([str(path)], "input", 4)
    assert idx.items == 1
    assert idx.find("please sum the first ten odd numbers") == (
        "sum the first ten", (str(path), 0))


def test_missing_eval_file_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="decontaminate.against"):
        decontam_reasons([row("q")], DecontamConfig(against=[str(tmp_path / "nope.jsonl")]))


@pytest.mark.skipif(GSM8K is None, reason="GSM8K jsonl files not found")
def test_gsm8k_test_questions_in_training_rows_are_caught_in_the_stage() -> None:
    assert GSM8K is not None
    with open(GSM8K / "test.jsonl") as fh:
        test = [json.loads(line) for _, line in zip(range(50), fh, strict=False)]
    with open(GSM8K / "train.jsonl") as fh:
        train = [json.loads(line) for _, line in zip(range(200), fh, strict=False)]
    rows = [{"id": f"tr{i}", "seed_id": f"tr{i}", "question": r["question"],
             "response": r["answer"], "gold": r["answer"]} for i, r in enumerate(train)]
    rows += [{"id": f"te{i}", "seed_id": f"te{i}", "question": r["question"].upper(),
              "response": r["answer"], "gold": r["answer"]} for i, r in enumerate(test[:10])]
    cfg = PipelineConfig.model_validate({
        "name": "t", "seeds": {"path": "x"},
        "filter": {"verify": {"faithfulness": False},
                   "decontaminate": {"against": [str(GSM8K / "test.jsonl")], "ngram": 13}}})
    out, funnel = filter_rows(rows, cfg)
    dropped = [r["id"] for r in out if r["drop_reason"] and "contaminated" in r["drop_reason"]]
    # GSM8K itself has a train/test template pair: train 20 ("Bella bought stamps at the post
    # office...") and test 632 ("Max bought stamps at the post office...", other numbers).
    assert dropped == ["tr20"] + [f"te{i}" for i in range(10)]
    assert out[20]["scores"]["contamination"]["eval_index"] == 632
    assert [r["scores"]["contamination"]["eval_index"] for r in out[200:]] == list(range(10))
    step = next(f for f in funnel["filters"] if f["name"] == "decontaminate")
    assert step["dropped"] == {"contaminated (test.jsonl)": 11}


def gsm8k_rows(split: str) -> list[dict[str, Any]]:
    assert GSM8K is not None
    with open(GSM8K / f"{split}.jsonl") as fh:
        return [{"question": json.loads(line)["question"]} for line in fh if line.strip()]


def flag_rate(rows: list[dict[str, Any]], ngram: int) -> float:
    assert GSM8K is not None
    cfg = DecontamConfig(against=[str(GSM8K / "test.jsonl")], ngram=ngram)
    return sum(r is not None for r in decontam_reasons(rows, cfg)) / len(rows)


@pytest.mark.skipif(GSM8K is None, reason="GSM8K jsonl files not found")
def test_proposed_ngram_spares_gsm8k_train_and_catches_edited_test_questions() -> None:
    train = gsm8k_rows("train")
    assert flag_rate(train, PROPOSED_NGRAM) <= 0.01
    assert flag_rate(train, PREVIOUS_NGRAM) > 0.01  # stock phrases: why 8 is no longer the default
    rng = random.Random(16)
    test = gsm8k_rows("test")
    edited = [{"question": light_edit(r["question"], rng).text} for r in test]
    assert flag_rate(edited, PROPOSED_NGRAM) >= 0.98
    own = [r["scores"]["contamination"]["eval_index"] == i for i, r in enumerate(edited)
           if "scores" in r]
    assert sum(own) / len(test) >= 0.98  # each caught copy names the test item it copies
