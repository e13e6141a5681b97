"""`report.md` and its plots, rendered from the run directory alone (`distill report RUN_DIR`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.evaluate.report_eval import evaluation_sections
from distill.export.report import compression_section
from distill.records import RunDir, atomic_path

LABELS = {"teacher": "teacher", "base_student": "base student (before distillation)",
          "label_only": "label-only student", "student": "distilled student (CoT SFT)",
          "kd": "KD student (soft targets)", "gkd": "GKD student (on-policy)"}
MAIN_STUDENT = {"sft": "distilled student (CoT SFT)",
                "kd": "distilled student (KD: CoT + soft targets)",
                "gkd": "distilled student (GKD, on-policy)"}


def labels(method: str | None) -> dict[str, str]:
    """Display names; the main student's says how it was trained (`train.method`)."""
    return LABELS | {"student": MAIN_STUDENT.get(method or "sft", LABELS["student"])}


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _fmt_bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def plot_accuracy(models: dict[str, Any], path: Path, lab: dict[str, str] = LABELS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in LABELS if n in models] + [n for n in models if n not in LABELS]
    acc = [models[n]["accuracy"] * 100 for n in names]
    lo = [a - models[n]["ci"][0] * 100 for a, n in zip(acc, names, strict=True)]
    hi = [models[n]["ci"][1] * 100 - a for a, n in zip(acc, names, strict=True)]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    colors = ["#555" if n == "teacher" else "#bbb" if n in ("base_student", "label_only")
              else "#2a7" for n in names]
    ax.barh([lab.get(n, n) for n in names], acc, xerr=[lo, hi], color=colors, capsize=3)
    ax.set_xlabel("held-out accuracy (%), 95% bootstrap CI")
    # Values sit right of the error bar's upper cap (they used to sit on the bar's end, under
    # the CI whisker); the axis runs past 100 so a label beside a 100% bar fits.
    ax.set_xlim(0, 112)
    ax.set_xticks(range(0, 101, 20))
    ax.invert_yaxis()
    for i, (a, h) in enumerate(zip(acc, hi, strict=True)):
        ax.text(a + h + 1.5, i, f"{a:.1f}", va="center", fontsize=8,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def plot_funnel(funnel: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [("generated", funnel["in"])] + [(f["name"], f["out"]) for f in funnel["filters"]]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(steps) + 1))
    ax.barh([s[0] for s in steps], [s[1] for s in steps], color="#48c")
    ax.invert_yaxis()
    ax.set_xlabel("rows remaining")
    for i, (_, v) in enumerate(steps):
        ax.text(v, i, f" {v}", va="center", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def plot_dev_curves(students: dict[str, Any], path: Path, lab: dict[str, str] = LABELS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for name, info in students.items():
        curve = info.get("dev_curve") or []
        if curve:
            ax.plot([c[0] for c in curve], [c[1] * 100 for c in curve], marker=".",
                    label=lab.get(name, name))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("dev accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def learning_section(train: dict[str, Any], run: RunDir) -> list[str]:
    students = train.get("students") or {}
    if not any(s.get("dev_curve") for s in students.values()):
        return []
    lab = labels(train.get("method"))
    plot_dev_curves(students, run.root / "learning_curves.png", lab)
    target = train.get("dev_target")
    reach = train.get("steps_to_dev_target") or {}
    lines = ["## Learning curves (development set, not the held-out set)", "",
             "![learning curves](learning_curves.png)", "",
             "| student | steps | train s | final dev accuracy | steps to reach "
             + (f"{target * 100:.1f}% (the main student's final) |" if target is not None
                else "the main student's final |"), "|---|---|---|---|---|"]
    for name, s in students.items():
        curve = s.get("dev_curve") or []
        final = f"{curve[-1][1] * 100:.1f}%" if curve else "-"
        got = reach.get(name)
        lines.append(f"| {lab.get(name, name)} | {s.get('steps', '-')} | "
                     f"{s.get('train_s', '-')} | {final} | {'never' if got is None else got} |")
    return [*lines, ""]


def cross_tokenizer_section(train: dict[str, Any]) -> list[str]:
    """Students distilled across tokenizers: the mode that ran and the teacher mass mapped."""
    from distill.train.xtok import xtok_summary_line

    lab = labels(train.get("method"))
    got = [f"- {lab.get(n, n)}: {line[2:].strip()}"
           for n, s in (train.get("students") or {}).items() if (line := xtok_summary_line(s))]
    return ["## Soft targets across tokenizers", "", *got, ""] if got else []


def write_report(run: RunDir) -> Path:
    manifest = run.manifest()
    stages = manifest.get("stages", {})
    lines = [f"# distill report — {manifest.get('name', run.root.name)}", ""]
    lines += ["## Stages", "", "| stage | status | seconds | notes |", "|---|---|---|---|"]
    for name, e in stages.items():
        notes = {k: v for k, v in e.items() if isinstance(v, int | float | str) and k not in (
            "status", "seconds", "started", "finished", "input_fingerprint", "error")}
        note = ", ".join(f"{k}={v}" for k, v in list(notes.items())[:8])
        if e.get("error"):
            note = f"error: {e['error']}"
        lines.append(f"| {name} | {e.get('status')} | {e.get('seconds', '-')} | {note} |")
    lines.append("")

    funnel = _load(run.stage("filter") / "funnel.json")
    if funnel:
        plot_funnel(funnel, run.root / "funnel.png")
        lines += ["## Data funnel", "", "![funnel](funnel.png)", "",
                  "| step | in | out | dropped |", "|---|---|---|---|"]
        for f in funnel["filters"]:
            dropped = ", ".join(f"{k}: {v}" for k, v in f["dropped"].items()) or "-"
            lines.append(f"| {f['name']} | {f['in']} | {f['out']} | {dropped} |")
        trained = stages.get("filter", {}).get("sft_rows")
        lines += ["", f"Generated {funnel['in']} → kept {funnel['out']}"
                  + (f" → trained on {trained}" if trained is not None else "") + ".", ""]

    metrics = _load(run.stage("evaluate") / "metrics.json")
    if metrics:
        models = metrics["models"]
        lab = labels((stages.get("train") or {}).get("method"))
        plot_accuracy(models, run.root / "accuracy.png", lab)
        lines += ["## Reasoning transfer", "", f"Held-out items: {metrics['n_eval']}.", "",
                  "![accuracy](accuracy.png)", "",
                  "| model | accuracy | 95% CI | params | weights on disk | latency / answer |"
                  " train s |", "|---|---|---|---|---|---|---|"]
        for n, mm in models.items():
            params = f"{mm['params']:,}" if mm.get("params") else "-"
            lat = f"{mm['latency_per_answer_s'] * 1000:.1f} ms" if mm.get(
                "latency_per_answer_s") else "-"
            lines.append(f"| {lab.get(n, n)} | {mm['accuracy'] * 100:.1f}% | "
                         f"[{mm['ci'][0] * 100:.1f}, {mm['ci'][1] * 100:.1f}] | {params} | "
                         f"{_fmt_bytes(mm.get('bytes'))} | {lat} | {mm.get('train_s') or '-'} |")
        lines.append("")
        for key, label in (("student_to_teacher_ratio", "student / teacher accuracy"),
                           ("gap_closed", "gap closed (student − base) / (teacher − base)"),
                           ("compression_ratio", "teacher / student parameters"),
                           ("cot_minus_label_only", "distilled student − label-only student")):
            if metrics.get(key) is not None:
                ci = metrics.get(f"{key}_ci")
                lines.append(f"- {label}: **{metrics[key]}**"
                             + (f" (95% bootstrap CI [{ci[0]}, {ci[1]}])" if ci else ""))
        lines.append("")
        lines += evaluation_sections(metrics, lab)

    lines += learning_section(stages.get("train") or {}, run)
    lines += cross_tokenizer_section(stages.get("train") or {})

    export = _load(run.stage("export") / "export.json")
    lines += compression_section(run.root)  # teacher -> student -> artifacts; [] without export
    if export:
        lines += ["## Edge export", "", "| format | runtime | params | bytes | vs teacher |"
                  " vs fp32 | accuracy | p50 latency | p95 latency | tok/s | peak MB |"
                  " max abs Δ logits | top-1 vs fp32 |", "|---" * 13 + "|"]
        tb, sb = export.get("teacher_bytes"), export.get("student_fp32_bytes")
        for a in export.get("artifacts", []):
            b = a.get("bytes") or 0
            def ratio(ref: int | None, b: int = b) -> str:
                return f"{ref / b:.1f}x" if ref and b else "-"
            acc = a.get("accuracy")
            diff = a.get("max_abs_dlogit", a.get("max_abs_diff"))
            lines.append(
                f"| {a['format']} | {a.get('runtime') or '-'} | {a.get('params') or '-'} | "
                f"{_fmt_bytes(b)} | {ratio(tb)} | "
                f"{ratio(sb)} | {'-' if acc is None else f'{acc * 100:.1f}%'} | "
                f"{a.get('latency_p50_s', '-')} | {a.get('latency_p95_s', '-')} | "
                f"{a.get('tokens_per_s', '-')} | {a.get('peak_mem_mb', '-')} | "
                f"{'-' if diff is None else f'{diff:.2g}'} | {a.get('top1_agreement', '-')}"
                f"{' **below floor**' if a.get('below_floor') else ''} |")
        lines.append("")
        if export.get("student_fp32_accuracy") is not None:
            lines.append(f"fp32 student accuracy: {export['student_fp32_accuracy'] * 100:.1f}% "
                         f"on {export.get('n_eval')} held-out items; peak MB: "
                         f"{export.get('peak_mem_method', 'RSS')}.")
        if export.get("prune"):
            p = export["prune"]
            lines.append(f"Pruned before export: {p.get('layers_before')} → "
                         f"{p.get('layers_after')} layers, {p.get('params_before'):,} → "
                         f"{p.get('params_after'):,} parameters, {p.get('recover_steps')} "
                         f"recovery steps (loss {p.get('loss_pruned')} → {p.get('loss_after')}).")
        if export.get("flagged"):
            lines.append(f"**Flagged** (teacher-forced top-1 agreement with the fp32 student "
                         f"under {export.get('min_top1_agreement')}): "
                         f"{', '.join(map(str, export['flagged']))}.")
        for a in export.get("artifacts", []):
            for note in a.get("notes") or []:
                lines.append(f"- {a['format']}: {note}")
        lines.append("")
    with atomic_path(run.report) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return run.report
