"""The compression table: teacher → distilled student → each exported artifact, with the size
ratio to the teacher and the accuracy kept at every step, plus a bytes-vs-accuracy plot.

Rendered from the run directory alone (`export/export.json`, `evaluate/metrics.json`), so the
report and the README quote the same measured numbers. Every accuracy is on the held-out set of
the evaluate stage with its scorer (export scores `export.eval_limit` of those items: the whole
set when it covers it, which `n` shows).

The two targets of issue #17 are checked and said plainly, met or missed:

- int8 keeps ≥ 99% of the fp32 student's accuracy at ≥ 3x fewer bytes;
- the smallest artifact that keeps ≥ 97% of the teacher's accuracy is ≥ 50x smaller than the
  teacher's bf16 weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.export.formats import FORMATS

INT8_KEEP, INT8_RATIO = 0.99, 3.0
TEACHER_KEEP, TEACHER_RATIO = 0.97, 50.0


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def fmt_bytes(n: int | None) -> str:
    if not n:
        return "-"
    if n < 1000:
        return f"{n} B"
    if n < 1_000_000:
        return f"{n / 1000:.1f} kB"
    return f"{n / 1_000_000:.2f} MB"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _ratio(ref: int | None, b: int | None) -> str:
    return f"{ref / b:.1f}x" if ref and b else "-"


def _kept(acc: float | None, ref: float | None) -> float | None:
    return None if acc is None or not ref else acc / ref


def compression_rows(export: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per step: teacher (fp32, bf16), the distilled student, each artifact."""
    t_acc = export.get("teacher_accuracy")
    s_acc = export.get("student_fp32_accuracy")
    rows: list[dict[str, Any]] = []
    if export.get("teacher_bytes"):
        for label, key in (("teacher, fp32 (4 B/param, as computed)", "teacher_bytes"),
                           ("teacher, bf16 weights (as shipped)", "teacher_bf16_bytes")):
            rows.append({"step": label, "params": export.get("teacher_params"),
                         "bytes": export.get(key), "accuracy": t_acc, "n": export.get(
                             "evaluate_n"), "runtime": "PyTorch (fp32)"})
    student_acc = export.get("evaluate_student_accuracy")
    rows.append({"step": "distilled student, fp32", "params": export.get("student_params"),
                 "bytes": export.get("student_fp32_bytes"),
                 "accuracy": student_acc if student_acc is not None else s_acc,
                 "n": export.get("evaluate_n") if student_acc is not None else
                 export.get("n_eval"), "runtime": "PyTorch (fp32), evaluate stage"})
    for a in export.get("artifacts", []):
        rows.append({"step": f"export: {a['format']}", "params": a.get("params"),
                     "bytes": a.get("bytes"), "accuracy": a.get("accuracy"),
                     "n": export.get("n_eval"), "runtime": a.get("runtime"),
                     "top1": a.get("top1_agreement"), "p50": a.get("latency_p50_s"),
                     "p95": a.get("latency_p95_s"), "tok_s": a.get("tokens_per_s"),
                     "peak_mb": a.get("peak_mem_mb"), "flagged": a.get("below_floor"),
                     "fp32_copy": a["format"] in FORMATS and FORMATS[a["format"]].fp32})
    for r in rows:
        r["ratio_bf16"] = r["bytes"] and export.get("teacher_bf16_bytes") and \
            export["teacher_bf16_bytes"] / r["bytes"]
        r["kept_teacher"] = _kept(r["accuracy"], t_acc)
        r["kept_student"] = _kept(r["accuracy"], s_acc)
    return rows


def target_lines(export: dict[str, Any]) -> list[str]:
    """The issue's two targets, each met or missed with the numbers behind it."""
    out = []
    by = {a["format"]: a for a in export.get("artifacts", [])}
    s_acc, t_acc = export.get("student_fp32_accuracy"), export.get("teacher_accuracy")
    i8 = by.get("int8")
    if i8 and i8.get("bytes") and i8.get("accuracy") is not None and s_acc:
        kept, ratio = i8["accuracy"] / s_acc, export["student_fp32_bytes"] / i8["bytes"]
        ok = kept >= INT8_KEEP and ratio >= INT8_RATIO
        out.append(f"- int8 keeps {kept * 100:.1f}% of the fp32 student's accuracy at "
                   f"{ratio:.2f}x fewer bytes (target: ≥ {INT8_KEEP:.0%} at ≥ "
                   f"{INT8_RATIO:.0f}x): **{'met' if ok else 'missed'}**")
    bf16 = export.get("teacher_bf16_bytes")
    if t_acc and bf16:
        keep = [a for a in export.get("artifacts", []) if a.get("bytes") and not
                a.get("below_floor") and a.get("accuracy") is not None and
                a["accuracy"] >= TEACHER_KEEP * t_acc]
        if keep:
            best = min(keep, key=lambda a: a["bytes"])
            ratio = bf16 / best["bytes"]
            out.append(f"- smallest artifact keeping ≥ {TEACHER_KEEP:.0%} of the teacher's "
                       f"accuracy: {best['format']}, {fmt_bytes(best['bytes'])} "
                       f"({best['accuracy'] * 100:.1f}% vs the teacher's {t_acc * 100:.1f}%), "
                       f"{ratio:.1f}x smaller than the teacher's bf16 weights (target: ≥ "
                       f"{TEACHER_RATIO:.0f}x): **{'met' if ratio >= TEACHER_RATIO else 'missed'}"
                       "**")
        else:
            out.append(f"- no artifact keeps ≥ {TEACHER_KEEP:.0%} of the teacher's accuracy "
                       f"({t_acc * 100:.1f}%): the ≥ {TEACHER_RATIO:.0f}x target is **missed**")
    return out


def plot_compression(rows: list[dict[str, Any]], teacher_acc: float | None, path: Path) -> None:
    """Held-out accuracy against bytes (log scale), one point per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distill.records import atomic_path

    # The fp32 artifact (merged) is the fp32 student again (same bytes and answers): one point.
    pts = sorted((r for r in rows if r["bytes"] and r["accuracy"] is not None
                  and not r.get("fp32_copy")), key=lambda r: r["bytes"])
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for i, r in enumerate(pts):
        color = "#555" if r["step"].startswith("teacher") else \
            "#c33" if r.get("flagged") else "#2a7"
        ax.scatter(r["bytes"], r["accuracy"] * 100, color=color, zorder=3)
        ax.annotate(r["step"].removeprefix("export: ").split(",")[0]
                    + (" bf16" if "bf16" in r["step"] else " fp32" if "fp32" in r["step"]
                       else ""), (r["bytes"], r["accuracy"] * 100), fontsize=7,
                    xytext=(4, 4 if i % 2 else -10), textcoords="offset points")
    ax.set_xscale("log")
    if teacher_acc:
        ax.axhline(teacher_acc * TEACHER_KEEP * 100, color="#999", lw=0.8, ls="--")
        ax.text(0.01, teacher_acc * TEACHER_KEEP * 100, f"{TEACHER_KEEP:.0%} of the teacher",
                fontsize=7, va="bottom", color="#666", transform=ax.get_yaxis_transform())
    ax.set_xlabel("bytes of weights (log scale)")
    ax.set_ylabel("held-out accuracy (%)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def compression_table(export: dict[str, Any]) -> list[str]:
    """The markdown table and the target lines (no plot)."""
    rows = compression_rows(export)
    lines = ["| step | params | bytes | teacher bf16 ÷ bytes | accuracy (n) | kept vs teacher |"
             " kept vs fp32 student | top-1 vs fp32 | p50 / p95 s per answer | tok/s |"
             " peak MB |", "|---" * 11 + "|"]
    bf16 = export.get("teacher_bf16_bytes")
    for r in rows:
        lat = f"{r['p50']} / {r['p95']}" if r.get("p50") is not None else "-"
        acc = f"{_pct(r['accuracy'])} ({r['n']})" if r["accuracy"] is not None else "-"
        flag = " ⚠ under the top-1 floor" if r.get("flagged") else ""
        lines.append(f"| {r['step']}{flag} | {r['params'] or '-':,} | {fmt_bytes(r['bytes'])} |"
                     f" {_ratio(bf16, r['bytes'])} | {acc} | {_pct(r['kept_teacher'])} | "
                     f"{_pct(r['kept_student'])} | {r.get('top1', '-') or '-'} | {lat} | "
                     f"{r.get('tok_s') or '-'} | {r.get('peak_mb') or '-'} |")
    return lines + ["", *target_lines(export)]


def compression_section(run_root: Path) -> list[str]:
    """`## Compression` for report.md (table, targets, plot written to compression.png), or []
    when the run has no export."""
    export = _load(run_root / "export" / "export.json")
    if not export:
        return []
    lines = ["## Compression", "",
             "Bytes are weight files only; accuracy is on the evaluate stage's held-out items "
             "with its scorer (n items); kept = accuracy ÷ the teacher's or the fp32 student's. "
             "The teacher is computed in fp32 from its bf16 weights (exact upcast), so both "
             "rows carry the same accuracy.", ""]
    lines += compression_table(export)
    plot_compression(compression_rows(export), export.get("teacher_accuracy"),
                     run_root / "compression.png")
    lines += ["", "![compression](compression.png)", ""]
    if export.get("prune"):
        p = export["prune"]
        lines.insert(-2, f"Pruned before export: {p.get('params_before'):,} → "
                         f"{p.get('params_after'):,} parameters.")
    return lines


def main() -> None:
    """`python -m distill.export.report RUN_DIR`: print the compression section."""
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m distill.export.report RUN_DIR")
    print("\n".join(compression_section(Path(sys.argv[1]))))


if __name__ == "__main__":
    main()
