"""Issue #20's statistics against hand computations: pass@k, maj@k tie-breaking, McNemar's exact
test, the paired bootstrap, the gap closed CI and the per-difficulty grouping."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from distill.evaluate.breakdown import breakdown, row_groups, solution_steps
from distill.evaluate.compare import paired
from distill.evaluate.metrics import (
    answer_key,
    gap_closed_ci,
    majority_vote,
    mcnemar_exact,
    mean_pass_at_k,
    paired_bootstrap_ci,
    pass_at_k,
)
from distill.evaluate.stage import maj_accuracy, sampled_summary


def brute_pass_at_k(correct: list[bool], k: int) -> float:
    """The definition: the share of all k-subsets of the samples holding a correct one."""
    subsets = list(itertools.combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_hand_values() -> None:
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)         # pass@1 = c / n
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0                        # fewer than k wrong: always hit
    assert pass_at_k(10, 3, 10) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_pass_at_k_equals_the_subset_definition() -> None:
    rng = random.Random(0)
    items = [[rng.random() < 0.3 for _ in range(6)] for _ in range(20)]
    for k in (1, 2, 3, 6):
        want = sum(brute_pass_at_k(c, k) for c in items) / len(items)
        assert mean_pass_at_k(items, k) == pytest.approx(want)


def test_majority_vote_ties_go_to_the_answer_voted_first() -> None:
    assert majority_vote(["7", "8", "8", "7"]) == 0       # 2-2: "7" was voted first
    assert majority_vote(["8", "7", "7", "8"]) == 0
    assert majority_vote([None, "5", "9", "9", "5"]) == 1  # unparsed answers do not vote
    assert majority_vote(["5", "7", "7"]) == 1             # a plain majority wins
    assert majority_vote([None, None]) is None
    # "18", "18.0" and "$18" are one answer; a percentage is another.
    assert majority_vote(["7", "18", "18.0", "$18", "7"]) == 1
    assert answer_key("50%") != answer_key("50")
    assert answer_key("18.0") == answer_key("$18") == answer_key("18")


def _rows(preds: list[str | None], gold: str, qid: str = "q") -> list[dict[str, object]]:
    return [{"id": qid, "mode": "sampled", "sample": i, "prediction": p, "correct": p == gold}
            for i, p in enumerate(preds)]


def test_maj_at_k_uses_the_first_k_samples_and_breaks_ties_deterministically() -> None:
    tie = _rows(["3", "4", "4", "3"], "3", "a")     # 2-2 tie: "3" voted first -> correct
    late = _rows(["4", "3", "3", "4"], "3", "b")    # 2-2 tie: "4" voted first -> wrong
    majority = _rows(["4", "3", "3", "3"], "3", "c")
    assert maj_accuracy([tie], 4) == 1.0
    assert maj_accuracy([late], 4) == 0.0
    assert maj_accuracy([majority], 1) == 0.0       # maj@1: sample 0 alone
    assert maj_accuracy([majority], 4) == 1.0
    summary = sampled_summary(tie + late + majority, 4, 0.7)
    assert summary["maj_at_k"] == {"1": round(1 / 3, 4), "4": round(2 / 3, 4)}
    assert summary["pass_at_k"] == {"1": round((0.5 + 0.5 + 0.75) / 3, 4), "4": 1.0}


def test_mcnemar_exact_known_values() -> None:
    def pairs(only_a: int, only_b: int, both: int = 3, neither: int = 2
              ) -> tuple[list[bool], list[bool]]:
        a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
        b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
        return a, b

    assert mcnemar_exact(*pairs(0, 5)) == pytest.approx(2 / 32)                 # 0.0625
    assert mcnemar_exact(*pairs(2, 8)) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert mcnemar_exact(*pairs(1, 9)) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(*pairs(8, 2)) == mcnemar_exact(*pairs(2, 8))            # symmetric
    assert mcnemar_exact(*pairs(4, 4)) == 1.0
    assert mcnemar_exact(*pairs(0, 0)) == 1.0                                     # no evidence
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in ((3, 11), (20, 35), (0, 1)):
        want = scipy_stats.binomtest(b, b + c, 0.5).pvalue
        assert mcnemar_exact(*pairs(b, c)) == pytest.approx(want)


def test_paired_bootstrap_ci_known_cases_and_normal_approximation() -> None:
    same = [True, False, True, True, False] * 20
    assert paired_bootstrap_ci(same, same, 200) == [0.0, 0.0]
    assert paired_bootstrap_ci([True] * 50, [False] * 50, 200) == [1.0, 1.0]
    # 400 items: a gets 60 more right, b 20 more; the rest agree. Paired differences are
    # +1 (60), -1 (20), 0 (320): mean 0.1, sd ~0.3742; normal CI 0.1 +- 1.96 * sd / 20.
    a = [True] * 60 + [False] * 20 + [True] * 200 + [False] * 120
    b = [False] * 60 + [True] * 20 + [True] * 200 + [False] * 120
    lo, hi = paired_bootstrap_ci(a, b, 4000, seed=1)
    d = [x - y for x, y in zip(a, b, strict=True)]
    sd = math.sqrt(sum((v - 0.1) ** 2 for v in d) / (len(d) - 1))
    assert lo == pytest.approx(0.1 - 1.96 * sd / 20, abs=0.006)
    assert hi == pytest.approx(0.1 + 1.96 * sd / 20, abs=0.006)
    # Unpaired, the two accuracies (0.65, 0.55) would each carry ~0.025 of standard error:
    # a ~0.137-wide interval. Pairing cancels the 320 shared items: ~0.073 wide.
    assert hi - lo < 0.09
    assert paired_bootstrap_ci(a, b, 500, seed=3) == paired_bootstrap_ci(a, b, 500, seed=3)


def test_paired_reports_each_present_pair_on_shared_items() -> None:
    correct = {"student": {"q1": True, "q2": True, "q3": False, "q4": True},
               "label_only": {"q1": False, "q2": True, "q3": False, "q4": False},
               "teacher": {"q1": True, "q2": True, "q3": True, "q4": True}}
    out = paired(correct, 100, 0)
    assert set(out) == {"student-vs-label_only", "student-vs-teacher"}
    r = out["student-vs-label_only"]
    assert r["diff"] == 0.5 and (r["a_only"], r["b_only"]) == (2, 0) and r["n"] == 4
    assert r["p"] == pytest.approx(0.5)  # 2 * (1/2)^2
    assert out["student-vs-teacher"]["diff"] == -0.25


def test_gap_closed_ci() -> None:
    teacher = [True] * 40 + [False] * 10
    base = [False] * 45 + [True] * 5
    assert gap_closed_ci(teacher, base, teacher, 300) == [1.0, 1.0]
    assert gap_closed_ci(base, base, teacher, 300) == [0.0, 0.0]
    assert gap_closed_ci(base, base, base, 300) is None  # no gap to close
    half = [True] * 20 + [False] * 30
    lo, hi = gap_closed_ci(half, base, teacher, 1000, seed=2)
    point = (0.4 - 0.1) / (0.8 - 0.1)
    assert 0.1 < lo < point < hi < 0.8


GSM8K_SOLUTION = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
                  "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18")


def test_difficulty_from_gold_solutions_and_task_rows() -> None:
    assert solution_steps(GSM8K_SOLUTION) == 2            # calculator notes
    assert solution_steps("First 2 + 3 = 5.\nThen 5 * 2 = 10.\nSo 10.\n#### 10") == 3  # lines
    assert solution_steps("18") is None
    assert row_groups({"answer": GSM8K_SOLUTION}) == {"template": None, "steps": 2}
    assert row_groups({"template": "shop_change", "steps": 4, "answer": "7"}) == {
        "template": "shop_change", "steps": 4}
    from distill.tasks import make_task

    rows = make_task("arithmetic", "test", 40, 0)
    groups = [row_groups(r) for r in rows]
    assert all(g["template"] and g["steps"] >= 2 for g in groups)
    table = breakdown([True] * 20 + [False] * 20, groups)
    assert sum(v["n"] for v in table["template"].values()) == 40
    steps = list(table["steps"])
    assert steps == sorted(steps, key=int)
    correct_by_steps = {str(s): 0 for s in steps}
    for ok, g in zip([True] * 20 + [False] * 20, groups, strict=True):
        correct_by_steps[str(g["steps"])] += ok
    for s, v in table["steps"].items():
        assert v["accuracy"] == round(correct_by_steps[s] / v["n"], 4)
