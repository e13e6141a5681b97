"""Model-vs-model figures for metrics.json: paired tests on the same items, the gap closed with
its CI, pass@k / maj@k side by side, and per-group accuracy.

Every comparison uses the greedy answers (what `accuracy` reports), item by item: two models
answered the same questions, so the question's own difficulty cancels in the difference. That
is what makes a 2-point gap on 500 items significant or not, which two separate CIs cannot say.
"""

from __future__ import annotations

from typing import Any

from distill.evaluate.breakdown import breakdown
from distill.evaluate.metrics import (
    discordant,
    gap_closed_ci,
    mcnemar_exact,
    paired_bootstrap_ci,
)

PAIRS = (("student", "label_only"), ("student", "base_student"), ("kd", "student"),
         ("gkd", "student"), ("student", "teacher"))
"""(a, b) reported as "a-vs-b" (diff = accuracy(a) - accuracy(b)) when both were evaluated."""


def greedy_correct(preds: list[dict[str, Any]]) -> dict[str, dict[str, bool]]:
    """{model: {item id: greedy answer correct}} from prediction rows."""
    out: dict[str, dict[str, bool]] = {}
    for p in preds:
        if p.get("mode", "greedy") == "greedy":
            out.setdefault(p["model"], {})[p["id"]] = bool(p["correct"])
    return out


def _aligned(correct: dict[str, dict[str, bool]], *names: str) -> list[list[bool]]:
    """Each model's answers on the items all of them answered, in one item order."""
    ids = [i for i in correct[names[0]] if all(i in correct[n] for n in names[1:])]
    return [[correct[n][i] for i in ids] for n in names]


def paired(correct: dict[str, dict[str, bool]], n_boot: int, seed: int
           ) -> dict[str, dict[str, Any]]:
    """{"a-vs-b": {diff, ci, p, a_only, b_only, n}} for every pair in PAIRS that was run."""
    out = {}
    for a, b in PAIRS:
        if a not in correct or b not in correct:
            continue
        x, y = _aligned(correct, a, b)
        a_only, b_only = discordant(x, y)
        out[f"{a}-vs-{b}"] = {
            "diff": round((sum(x) - sum(y)) / len(x), 4) if x else 0.0,
            "ci": paired_bootstrap_ci(x, y, n_boot, seed=seed),
            "p": round(mcnemar_exact(x, y), 6), "a_only": a_only, "b_only": b_only,
            "n": len(x)}
    return out


def gap_ci(correct: dict[str, dict[str, bool]], n_boot: int, seed: int) -> list[float] | None:
    """Bootstrap CI of the gap closed, when student, base student and teacher all ran."""
    if not {"student", "base_student", "teacher"} <= set(correct):
        return None
    s, b, t = _aligned(correct, "student", "base_student", "teacher")
    return gap_closed_ci(s, b, t, n_boot, seed=seed)


def per_model(models: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
    """{model: models[model][key]} for the models that have it (pass_at_k, maj_at_k)."""
    return {n: m[key] for n, m in models.items() if key in m}


def breakdowns(preds: list[dict[str, Any]]) -> dict[str, Any]:
    """{model: {template|steps: {group: {n, accuracy}}}} of the greedy answers."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for p in preds:
        if p.get("mode", "greedy") == "greedy":
            rows.setdefault(p["model"], []).append(p)
    return {m: breakdown([p["correct"] for p in r], r) for m, r in rows.items()}


def comparison_metrics(models: dict[str, dict[str, Any]], preds: list[dict[str, Any]],
                       n_boot: int, seed: int) -> dict[str, Any]:
    """The metrics.json keys added by issue #20 (harness scores are added by the stage)."""
    correct = greedy_correct(preds)
    return {"pass_at_k": per_model(models, "pass_at_k"),
            "maj_at_k": per_model(models, "maj_at_k"),
            "paired": paired(correct, n_boot, seed),
            "gap_closed_ci": gap_ci(correct, n_boot, seed),
            "breakdown": breakdowns(preds)}
