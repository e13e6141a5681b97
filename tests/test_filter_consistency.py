"""Self-consistency: majority vote per seed, pseudo-labels for seeds without gold."""

from __future__ import annotations

from typing import Any

from distill.config import ConsistencyConfig
from distill.filter.consistency import consistency_reasons, majority_votes, vote_key


def samples(seed: str, answers: list[str | None], gold: str | None = None) -> list[dict[str, Any]]:
    return [{"id": f"{seed}-{i}", "seed_id": seed, "question": f"question {seed}", "gold": gold,
             "answer": a, "response": f"... The answer is {a}." if a else "I give up."}
            for i, a in enumerate(answers)]


def run(rows: list[dict[str, Any]], **cfg: Any) -> list[str | None]:
    return consistency_reasons(rows, rows, ConsistencyConfig(**cfg))


def test_normalized_answers_vote_together() -> None:
    assert vote_key("$1,200.00") == vote_key("1200") == vote_key("1,200")
    assert vote_key("0.5") == vote_key("1/2")
    assert vote_key("B") == vote_key("b")
    votes = majority_votes(samples("s", ["$1,200", "1200.00", "1,200", "1100"]))
    assert votes["s"].count == 3 and votes["s"].agreement == 0.75
    assert votes["s"].answer == "1200"


def test_majority_becomes_pseudo_label_for_seeds_without_gold() -> None:
    rows = samples("s", ["12", "12", "12", "15"])
    reasons = run(rows)
    assert reasons == [None, None, None, "not the majority answer"]
    assert all(r["pseudo_label"] == "12" and r["gold"] is None for r in rows)
    assert [r["scores"]["agreement"] for r in rows] == [0.75] * 4
    assert [r["scores"]["majority"] for r in rows] == [True, True, True, False]


def test_keep_all_rows_of_an_agreeing_seed() -> None:
    rows = samples("s", ["12", "12", "12", "15"])
    assert run(rows, keep="all") == [None] * 4


def test_low_agreement_and_ties_drop_the_seed() -> None:
    low = samples("s", ["1", "1", "2", "3", "4"])  # 0.4 < 0.5
    assert run(low) == ["low agreement"] * 5
    tie = samples("t", ["1", "1", "2", "2"])
    assert run(tie) == ["tied vote"] * 4
    assert tie[0]["pseudo_label"] is None
    assert run(samples("u", ["1", "1", "2", "3", "4"]), min_agreement=0.4) == [
        None, None, "not the majority answer", "not the majority answer",
        "not the majority answer"]


def test_answerless_samples_count_against_agreement() -> None:
    rows = samples("s", ["7", None, None, None])
    assert run(rows) == ["low agreement"] * 4
    assert rows[0]["scores"]["agreement"] == 0.25
    assert run(samples("e", [None, None])) == ["no answer to vote on"] * 2


def test_seeds_with_gold_only_record_agreement_unless_asked_to_vote() -> None:
    rows = samples("g", ["7", "8", "8"], gold="7")
    assert run(rows) == [None, None, None]
    assert "pseudo_label" not in rows[0]
    assert rows[0]["scores"]["agreement"] == round(2 / 3, 4)
    assert run(rows, vote_on_gold=True) == ["not the majority answer", None, None]


def test_votes_come_from_all_samples_even_those_dropped_earlier() -> None:
    voters = samples("s", ["5", "5", "5", "6"])
    survivors = voters[3:]  # say verify or heuristics dropped the first three
    assert consistency_reasons(survivors, voters, ConsistencyConfig()) == [
        "not the majority answer"]


def test_rows_without_seed_id_group_by_question() -> None:
    rows: list[dict[str, Any]] = [
            {"question": "What is 2+2?", "response": "2 + 2 = 4. The answer is 4."},
            {"question": "what is 2+2? ", "response": "The answer is 4"},
            {"question": "What is 3+3?", "response": "The answer is 7"}]
    assert run(rows) == [None, None, None]
    assert rows[0]["scores"]["agreement"] == 1.0 and rows[2]["pseudo_label"] == "7"
