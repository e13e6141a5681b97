"""report.md sections for issue #20's metrics: sampled pass@k / maj@k, paired comparisons,
per-template / per-difficulty accuracy and lm-evaluation-harness scores.

Each function takes metrics.json (as loaded) and returns markdown lines, empty when the metric
was not computed, so a report of an older run directory renders as before.
"""

from __future__ import annotations

from typing import Any


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _model_order(metrics: dict[str, Any], names: list[str]) -> list[str]:
    """Models in the main table's order (teacher, base, students), then any others."""
    order = list(metrics.get("models", {}))
    return [n for n in order if n in names] + [n for n in names if n not in order]


def sampled_section(metrics: dict[str, Any], lab: dict[str, str]) -> list[str]:
    """pass@1 / pass@n / maj@1 / maj@n beside greedy accuracy, when evaluate.samples > 1."""
    pass_k, maj_k = metrics.get("pass_at_k") or {}, metrics.get("maj_at_k") or {}
    if not pass_k:
        return []
    models = metrics.get("models", {})
    first = next(iter(pass_k.values()))
    ks = sorted(first, key=int)
    temp = next((m.get("temperature") for m in models.values() if "temperature" in m), None)
    n = max(int(k) for k in ks)
    lines = ["### Sampled answers", "",
             f"{n} samples per item at temperature {temp}, beside the greedy answer "
             "(accuracy). pass@k: unbiased estimator (Chen et al. 2021), the chance that k "
             "samples include a correct one. maj@k: the majority answer of samples 0..k-1 is "
             "correct (ties: the answer voted first wins; unparsed answers do not vote).", "",
             "| model | greedy accuracy | " + " | ".join(f"pass@{k}" for k in ks) + " | "
             + " | ".join(f"maj@{k}" for k in ks) + " |", "|---" * (2 + 2 * len(ks)) + "|"]
    for name in _model_order(metrics, list(pass_k)):
        acc = models.get(name, {}).get("accuracy")
        cells = [_pct(pass_k[name].get(k)) for k in ks] + [
            _pct((maj_k.get(name) or {}).get(k)) for k in ks]
        lines.append(f"| {lab.get(name, name)} | {_pct(acc)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def paired_section(metrics: dict[str, Any]) -> list[str]:
    """Each comparison: difference in points with its paired 95% CI and McNemar's p."""
    pairs = metrics.get("paired") or {}
    if not pairs:
        return []
    lines = ["### Paired comparisons (same items, greedy answers)", "",
             "Difference a − b in accuracy points; 95% CI from a paired bootstrap over items; "
             "p: exact McNemar test on the items only one of the two got right.", "",
             "| a vs b | a − b | 95% CI | McNemar p | only a right | only b right |",
             "|---|---|---|---|---|---|"]
    for key, r in pairs.items():
        lo, hi = r["ci"]
        lines.append(f"| {key} | {r['diff'] * 100:+.1f} | [{lo * 100:+.1f}, {hi * 100:+.1f}] | "
                     f"{_p(r['p'])} | {r.get('a_only', '-')} | {r.get('b_only', '-')} |")
    return [*lines, ""]


def _p(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}" if p < 0.01 else f"{p:.3f}"


def breakdown_section(metrics: dict[str, Any], lab: dict[str, str]) -> list[str]:
    """One table per dimension (template, steps): a row per group, a column per model."""
    table = metrics.get("breakdown") or {}
    if not table:
        return []
    names = _model_order(metrics, list(table))
    lines: list[str] = []
    titles = {"template": ("By template", "template"),
              "steps": ("By difficulty (reasoning steps in the gold solution)", "steps")}
    for dim, (title, head) in titles.items():
        groups = _groups(table, names, dim)
        if not groups:
            continue
        lines += [f"### {title}", "", f"| {head} | n | "
                  + " | ".join(lab.get(n, n) for n in names) + " |",
                  "|---" * (2 + len(names)) + "|"]
        for g, count in groups.items():
            cells = [_pct(((table[n].get(dim) or {}).get(g) or {}).get("accuracy"))
                     for n in names]
            lines.append(f"| {g} | {count} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _groups(table: dict[str, Any], names: list[str], dim: str) -> dict[str, int]:
    """{group: n} in the order the first model that has the dimension lists them."""
    for n in names:
        rows = (table[n] or {}).get(dim)
        if rows:
            return {g: r["n"] for g, r in rows.items()}
    return {}


def harness_section(metrics: dict[str, Any], lab: dict[str, str]) -> list[str]:
    """lm-evaluation-harness scores next to our own greedy accuracy, a row per model."""
    scores = metrics.get("harness") or {}
    info = metrics.get("harness_info") or {}
    if not scores and not info:
        return []
    cols = sorted({(t, k) for s in scores.values() for t, row in s.items() for k in row
                   if "_stderr" not in k})
    lines = ["### lm-evaluation-harness", "",
             f"lm-eval {info.get('lm_eval_version', '?')}; "
             + ", ".join(f"{t}: {v.get('n')} items, {v.get('num_fewshot')}-shot"
                         for t, v in (info.get("tasks") or {}).items())
             + (", chat template" if info.get("apply_chat_template") else "")
             + ". Our accuracy is the held-out set above, with the pipeline's own prompt.", "",
             "| model | our accuracy | " + " | ".join(f"{t} {k}" for t, k in cols) + " |",
             "|---" * (2 + len(cols)) + "|"]
    models = metrics.get("models", {})
    for name in _model_order(metrics, list(scores)):
        cells = [_pct(scores[name].get(t, {}).get(k)) for t, k in cols]
        lines.append(f"| {lab.get(name, name)} | {_pct(models.get(name, {}).get('accuracy'))} | "
                     + " | ".join(cells) + " |")
    for name, why in (info.get("skipped") or {}).items():
        lines.append(f"\n{lab.get(name, name)}: not run through the harness ({why}).")
    return [*lines, ""]


def evaluation_sections(metrics: dict[str, Any], lab: dict[str, str]) -> list[str]:
    """All of the above, in report order."""
    return (sampled_section(metrics, lab) + paired_section(metrics)
            + breakdown_section(metrics, lab) + harness_section(metrics, lab))
