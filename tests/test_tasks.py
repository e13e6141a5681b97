"""The procedural tasks: deterministic, disjoint splits, correct gold chains of thought."""

from __future__ import annotations

import re

import pytest

from distill.tasks import TASKS, check_solution, make_task, parse_answer, prompt_text
from distill.tasks.arithmetic import TEMPLATES, split_of


@pytest.fixture(scope="module")
def train_rows() -> list[dict]:
    return make_task("arithmetic", "train", 4000, seed=0)


@pytest.fixture(scope="module")
def test_rows() -> list[dict]:
    return make_task("arithmetic", "test", 2000, seed=0)


def canonical(row: dict) -> str:
    # What makes two problems the same problem, recovered from the visible text alone:
    # the template and every number of the question (names and item words are surface).
    numbers = re.findall(r"\d+", row["question"])
    return f"{row['template']}|{','.join(numbers)}"


def test_registry_and_row_schema(train_rows: list[dict]) -> None:
    assert "arithmetic" in TASKS
    row = train_rows[0]
    assert {"id", "question", "answer", "solution", "source", "steps"} <= set(row)
    assert row["source"] == "arithmetic"
    assert isinstance(row["answer"], str) and row["answer"].isdigit()
    assert len({r["id"] for r in train_rows}) == len(train_rows)


def test_deterministic_and_prefix_stable() -> None:
    a = make_task("arithmetic", "test", 300, seed=0)
    assert a == make_task("arithmetic", "test", 300, seed=0)
    assert make_task("arithmetic", "test", 100, seed=0) == a[:100]
    assert make_task("arithmetic", "test", 300, seed=1) != a


def test_splits_never_overlap(train_rows: list[dict], test_rows: list[dict]) -> None:
    other_seed = make_task("arithmetic", "train", 4000, seed=7)
    train_keys = {canonical(r) for r in train_rows + other_seed}
    test_keys = {canonical(r) for r in test_rows}
    assert len(test_keys) == len(test_rows)  # no duplicates inside a split either
    assert not train_keys & test_keys
    assert not {r["question"] for r in train_rows} & {r["question"] for r in test_rows}
    assert {r["template"] for r in test_rows} == set(TEMPLATES)


def test_split_is_a_function_of_the_problem() -> None:
    keys = [f"shop_total|{a},{p},3,4" for a in range(2, 10) for p in range(2, 13)]
    assert [split_of(k) for k in keys] == [split_of(k) for k in keys]
    share = sum(split_of(k) == "test" for k in keys) / len(keys)
    assert 0.05 < share < 0.4


@pytest.mark.parametrize("split", ["train", "test"])
def test_gold_solutions_are_correct(split: str, train_rows: list[dict],
                                    test_rows: list[dict]) -> None:
    rows = train_rows if split == "train" else test_rows
    for row in rows:
        ok, n_eqs = check_solution(row["solution"])
        assert ok, row["solution"]
        assert n_eqs == row["steps"]
        assert 2 <= row["steps"] <= 4
        lines = row["solution"].splitlines()
        assert lines[-1] == f"The answer is {row['answer']}."
        # The answer is the result of the last step.
        assert lines[-2].rstrip(".").split(" = ")[1].split()[0] == row["answer"]
        assert parse_answer(row["solution"]) == row["answer"]
        numbers = [int(n) for n in re.findall(r"\d+", row["question"] + row["solution"])]
        assert all(0 <= n <= 999 for n in numbers)


def test_steps_cover_two_to_four(train_rows: list[dict]) -> None:
    assert {r["steps"] for r in train_rows} == {2, 3, 4}


def test_prompt_and_parse() -> None:
    assert prompt_text("What is 2 + 3?") == "What is 2 + 3?\nLet's think step by step."
    assert parse_answer("2 + 3 = 5.\nThe answer is 5.") == "5"
    assert parse_answer("The answer is $1,200.") == "1200"
    assert parse_answer("The answer is 7.0") == "7"
    assert parse_answer("no answer here") is None


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        make_task("nope", "train", 1, 0)
    with pytest.raises(ValueError, match="split"):
        make_task("arithmetic", "dev", 1, 0)
