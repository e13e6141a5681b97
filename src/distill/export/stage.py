"""The export stage: `student/` → `export/<format>/` + `export/export.json`.

Order of work: `prepare` — (optional) prune + recover → merged (the base of every other
format); `export_one` per format — int8, onnx, int4 (from the onnx graph, or 4-bit safetensors
with `int4_runtime: torch`), gguf, written and measured; `summarize` — ratios and export.json.
What each format is (its file, runtime, writer, loader and place in that order) is read from the
table in `formats.py`, not switched on here by name.

Each artifact is loaded back in its own runtime and measured the same way (`measure.py`): bytes,
held-out accuracy with the evaluate stage's scorer (PyTorch artifacts through evaluate's own
batched backend, ONNX graphs batched in ONNX Runtime, GGUF one prompt at a time), CPU latency
per answer, tokens/s, peak memory, and fidelity to the PyTorch fp32 model: teacher-forced top-1
agreement and max |Δlogit| on several held-out prompts followed by the fp32 model's own greedy
answer (the same token ids for every format).

Accuracy on a few dozen items cannot see a broken artifact (torch dynamic int8 on SmolLM2-135M
scored `accuracy_vs_fp32` 1.0 on 8 items with top-1 agreement 0.47), so an artifact whose
agreement is under `export.min_top1_agreement` (default 0.98) is flagged (`below_floor`, a note,
and `flagged` in export.json). A format that cannot be written or loaded for this model is
skipped with the reason in its notes; the other formats still export and are measured.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from distill.config import ConfigError, PipelineConfig
from distill.evaluate.stage import held_out_inputs
from distill.export.files import dir_params, weight_bytes
from distill.export.formats import (
    ArtifactFormat,
    Layout,
    WriteJob,
    base_format,
    export_plan,
    load_runner,
)
from distill.export.measure import (
    PEAK_MEM_METHOD,
    ForcedSequence,
    accuracy,
    eval_items,
    fidelity,
    fidelity_sequences,
    measure,
)
from distill.export.merge import TorchRunner, export_merged, load_torch_model
from distill.export.runtime import load_tokenizer_dir, require_model_dir, stop_ids
from distill.records import RunDir, write_json, write_jsonl
from distill.stages import Stage

console = Console(stderr=True)


def teacher_size(cfg: PipelineConfig, run_dir: Path | None) -> dict[str, Any]:
    """Teacher params, fp32 bytes (4 × params) and bytes on disk, where they can be known."""
    import json

    from distill.evaluate.stage import dir_bytes

    params: int | None = cfg.export.teacher_params if cfg.export else None
    disk: int | None = None
    if cfg.teacher.backend == "transformers" and cfg.teacher.model:
        path = cfg.resolve(cfg.teacher.model)
        if path.is_dir():
            disk = dir_bytes(path)
            params = params or dir_params(path) or None
    metrics = run_dir / "evaluate" / "metrics.json" if run_dir else None
    if params is None and metrics is not None and metrics.is_file():
        params = json.loads(metrics.read_text()).get("teacher_params")
    return {"teacher_params": params, "teacher_bytes": 4 * params if params else None,
            "teacher_bf16_bytes": 2 * params if params else None, "teacher_disk_bytes": disk}


def evaluate_accuracies(run_dir: Path | None) -> dict[str, Any]:
    """The teacher's and the student's held-out accuracy from the evaluate stage (the same items
    and scorer as export's when export.eval_limit covers the evaluate set), where it ran."""
    import json

    path = run_dir / "evaluate" / "metrics.json" if run_dir else None
    if path is None or not path.is_file():
        return {}
    m = json.loads(path.read_text())
    return {"teacher_accuracy": m.get("teacher_accuracy"),
            "evaluate_student_accuracy": m.get("student_accuracy"),
            "evaluate_n": m.get("n_eval")}


DEFAULT_MIN_TOP1 = 0.98


def _ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    """a / b, rounded; None only when either is unknown or b is 0 (0.0 / x is 0.0)."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)


def min_top1(cfg: PipelineConfig) -> float:
    """The agreement floor, `export.min_top1_agreement`."""
    return cfg.export.min_top1_agreement if cfg.export is not None else DEFAULT_MIN_TOP1


def flag_row(row: dict[str, Any], floor: float) -> None:
    """Mark an artifact whose teacher-forced top-1 agreement is under the floor."""
    top1 = row.get("top1_agreement")
    row["below_floor"] = top1 is not None and top1 < floor
    if row["below_floor"]:
        row["notes"].append(f"FLAGGED: top-1 agreement with fp32 {top1} < floor {floor} "
                            f"(max |dlogit| {row.get('max_abs_dlogit')}): do not ship this "
                            "artifact without checking its answers")


def _write(layout: Layout, job: WriteJob, path: Path) -> dict[str, Any]:
    """The layout's writer into a fresh `path`, with any failure turned into {"skipped":
    reason}: one format that cannot handle this model must not cost the others."""
    assert layout.write is not None
    if path.exists():
        shutil.rmtree(path)
    try:
        return layout.write(job, path)
    except Exception as err:  # noqa: BLE001 - recorded in export.json, never silent
        shutil.rmtree(path, ignore_errors=True)
        return {"skipped": f"export failed ({type(err).__name__}: {str(err)[:300]})"}


def _new_row(fmt: str, layout: Layout, out: Path, params: int, info: dict[str, Any],
             name: str | None = None) -> dict[str, Any]:
    """`name`: the output directory's final name when `out` is a staging directory."""
    row: dict[str, Any] = {"format": fmt, "path": f"{name or out.name}/{fmt}",
                           "params": params, "bytes": None, "accuracy": None,
                           "latency_p50_s": None, "latency_p95_s": None,
                           "tokens_per_s": None, "peak_mem_mb": None,
                           "top1_agreement": None, "max_abs_dlogit": None,
                           "below_floor": None, "runtime": layout.runtime,
                           "notes": list(info.get("notes", []))}
    if "skipped" in info:
        row["notes"].append(f"skipped: {info['skipped']}")
    return row


def _measure_row(row: dict[str, Any], fmt: str, path: Path, info: dict[str, Any],
                 cfg: PipelineConfig, items: list[dict[str, Any]], seqs: list[ForcedSequence],
                 threads: int) -> list[dict[str, Any]]:
    """Bytes, then (when a runtime can load it) speed, memory, accuracy and fidelity; returns
    the predictions."""
    row["bytes"] = weight_bytes(path)
    if "roundtrip" in info:
        row["gguf_roundtrip_max_abs_diff"] = info["roundtrip"]["max_abs_diff"]
    if info.get("unmeasured"):
        row["notes"].append(f"not measured: {info['unmeasured']}")
        return []
    try:
        metrics, preds, runner = measure(
            lambda: load_runner(fmt, path, threads=threads), cfg, items, fmt)
    except ConfigError as err:
        row["notes"].append(f"not measured: no runtime here loads it ({err})")
        return []
    row |= metrics
    row |= fidelity(runner, seqs)
    row["max_abs_diff"] = row["max_abs_dlogit"]  # the name report.md reads
    said = runner.describe()
    notes = said.pop("notes", [])
    row |= said
    row["notes"] += notes
    runner.close()
    del runner
    gc.collect()
    return preds


@dataclass
class Prepared:
    """What every artifact is written from and measured against (`prepare`'s result)."""

    cfg: PipelineConfig
    out: Path
    plan: list[tuple[ArtifactFormat, Layout]]
    threads: int
    items: list[dict[str, Any]]
    doc: dict[str, Any]
    """export.json's fields known before any artifact (sizes, teacher, prune)."""
    job: WriteJob
    merged_info: dict[str, Any]
    params: int
    seqs: list[ForcedSequence]
    floor: float
    fp32_acc: float | None
    """The fp32 student's accuracy when measured apart (pruned, or no fp32 format asked for)."""
    t_start: float


def prepare(cfg: PipelineConfig, student_dir: Path, out: Path, sft_dir: Path | None = None,
            run_dir: Path | None = None) -> Prepared:
    """Check the inputs; prune and recover when asked; save the fp32 base (merged) every format
    is made from; build the fidelity sequences; score the fp32 student when no artifact is it."""
    import torch

    e = cfg.export
    if e is None:
        raise ConfigError("export: section missing from the pipeline file")
    require_model_dir(student_dir, "student")
    plan = export_plan(e)
    threads = e.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    items = eval_items(cfg)
    t_start = time.perf_counter()

    student = load_torch_model(student_dir, "student")
    student_params = sum(p.numel() for p in student.parameters())
    doc: dict[str, Any] = {"student_dir": str(student_dir), "student_params": student_params,
                           "student_fp32_bytes": 4 * student_params,
                           **teacher_size(cfg, run_dir), "n_eval": len(items),
                           "threads": threads, "peak_mem_method": PEAK_MEM_METHOD,
                           "notes": ["bytes: weight/graph files only (tokenizer and config "
                                     "files are shared by every format)",
                                     "teacher_bytes and student_fp32_bytes: 4 bytes per "
                                     "parameter (fp32); teacher_bf16_bytes: 2"]}
    doc |= evaluate_accuracies(run_dir)

    pruned = None
    if e.prune is not None:
        from distill.export.prune import prune_and_recover
        from distill.io import read_stage_rows

        if sft_dir is None or not ((sft_dir / "sft.jsonl").exists()
                                   or (sft_dir / "dataset").exists()):
            raise ConfigError(f"export.prune: needs the SFT set for calibration and recovery "
                              f"({sft_dir}/sft.jsonl not found)")
        tok = load_tokenizer_dir(student_dir)
        pruned, doc["prune"] = prune_and_recover(student, tok, read_stage_rows(
            sft_dir, "sft.jsonl"), e.prune, seed=cfg.seed)

    merged_dir = out / base_format().name
    base = cfg.train.student
    base_model = str(cfg.resolve(base)) if base and cfg.resolve(base).exists() else base or None
    merged_info = export_merged(student_dir, merged_dir, base_model=base_model, model=pruned)
    model = pruned if pruned is not None else load_torch_model(merged_dir, "merged model")
    params = sum(p.numel() for p in model.parameters())
    tok = load_tokenizer_dir(merged_dir)
    ref_runner = TorchRunner(model, tok, stop_ids(tok, merged_dir), "reference", threads)
    # Fidelity prompts come from the whole held-out set, not only the first eval_limit items.
    seqs = fidelity_sequences(ref_runner, model, cfg, eval_items(cfg, limited=False))

    # Accuracy of the fp32 student as trained: the yardstick of every artifact.
    fp32_acc: float | None = None
    if pruned is not None or not any(f.fp32 for f, _ in plan):
        fp32_runner = TorchRunner(student, tok, ref_runner.eos_ids, "student", threads)
        fp32_acc, _ = accuracy(fp32_runner, cfg, items, "student_fp32")
    del student
    gc.collect()
    return Prepared(cfg, out, plan, threads, items, doc, WriteJob(model, merged_dir, out, cfg),
                    merged_info, params, seqs, min_top1(cfg), fp32_acc, t_start)


def export_one(p: Prepared, fmt: ArtifactFormat, layout: Layout, name: str | None = None
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Write one artifact (the fp32 base is already written) and measure it in its runtime:
    its export.json row and its predictions."""
    path = p.out / fmt.name
    t0 = time.perf_counter()
    info = p.merged_info if layout.write is None else _write(layout, p.job, path)
    row = _new_row(fmt.name, layout, p.out, p.params, info, name)
    row["export_s"] = round(time.perf_counter() - t0, 2)
    preds: list[dict[str, Any]] = []
    if "skipped" not in info:
        t0 = time.perf_counter()
        preds = _measure_row(row, fmt.name, path, info, p.cfg, p.items, p.seqs, p.threads)
        row["measure_s"] = round(time.perf_counter() - t0, 2)
        flag_row(row, p.floor)
    return row, preds


def summarize(p: Prepared, artifacts: list[dict[str, Any]], preds: list[dict[str, Any]]
              ) -> dict[str, Any]:
    """Ratios to the fp32 student and the teacher, the flagged, skipped and smallest artifacts;
    writes `export.json` and `predictions.jsonl`."""
    doc = p.doc
    fp32 = {f.name for f, _ in p.plan if f.fp32}
    fp32_acc = p.fp32_acc
    if fp32_acc is None:
        fp32_acc = next((a["accuracy"] for a in artifacts if a["format"] in fp32), None)
    if not fp32:
        shutil.rmtree(p.job.merged_dir, ignore_errors=True)
    for row in artifacts:
        row["ratio_vs_fp32"] = _ratio(doc["student_fp32_bytes"], row["bytes"])
        row["ratio_vs_teacher"] = _ratio(doc["teacher_bytes"], row["bytes"])
        row["ratio_vs_teacher_bf16"] = _ratio(doc["teacher_bf16_bytes"], row["bytes"])
        row["accuracy_vs_fp32"] = _ratio(row["accuracy"], fp32_acc, 4)
        row["accuracy_vs_teacher"] = _ratio(row["accuracy"], doc.get("teacher_accuracy"), 4)
    doc["student_fp32_accuracy"] = fp32_acc
    doc["min_top1_agreement"] = p.floor
    doc["fidelity_method"] = (f"teacher-forced on {len(p.seqs)} held-out prompts + the fp32 "
                              "student's greedy answer; prompt prefilled, answer fed one token "
                              "at a time through the runtime's KV cache")
    doc["artifacts"] = artifacts
    doc["flagged"] = [a["format"] for a in artifacts if a.get("below_floor")]
    doc["skipped"] = [a["format"] for a in artifacts if a["bytes"] is None]
    # The smallest artifact worth shipping: measured and not under the agreement floor.
    sized = [a for a in artifacts if a["bytes"] and not a.get("below_floor")]
    if sized:
        smallest = min(sized, key=lambda a: a["bytes"])
        doc["smallest"] = {"format": smallest["format"], "bytes": smallest["bytes"],
                           "ratio_vs_teacher": smallest["ratio_vs_teacher"],
                           "ratio_vs_fp32": smallest["ratio_vs_fp32"]}
    doc["wall_s"] = round(time.perf_counter() - p.t_start, 1)
    write_jsonl(p.out / "predictions.jsonl", preds)
    write_json(p.out / "export.json", doc)
    return doc


DONE = ".done"
"""In a staging directory: one `<format>.json` (its export.json row and predictions) per
artifact written and measured, and `key.json`, the export they belong to."""


def _finished_formats(out: Path, key: str | None) -> Path | None:
    """The staging directory's record of finished artifacts for export `key` (None: no resume).
    A staging directory of another export (config or student changed) starts over."""
    if key is None:
        return None
    done = out / DONE
    try:
        same = json.loads((done / "key.json").read_text()).get("key") == key
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(out, ignore_errors=True)
        done.mkdir(parents=True)
        write_json(done / "key.json", {"key": key})
    return done


def export_all(cfg: PipelineConfig, student_dir: Path, out: Path,
               sft_dir: Path | None = None, run_dir: Path | None = None, *,
               name: str | None = None, resume_key: str | None = None) -> dict[str, Any]:
    """Export and measure every format of `cfg.export.formats`; writes `out/export.json`.

    With `resume_key`, `out` is a staging directory that keeps each finished artifact (its
    files, row and predictions) across an interrupted run: the rerun of the same export writes
    and measures only the others. `name`: the directory's final name (the rows' `path`)."""
    done = _finished_formats(out, resume_key)
    p = prepare(cfg, student_dir, out, sft_dir, run_dir)
    artifacts, all_preds = [], []
    for fmt, layout in p.plan:
        saved = done / f"{fmt.name}.json" if done is not None else None
        if saved is not None and saved.is_file():
            kept = json.loads(saved.read_text())
            row, preds = kept["row"], kept["predictions"]
            console.print(f"[dim]export {fmt.name}: kept from the interrupted run[/dim]")
        else:
            row, preds = export_one(p, fmt, layout, name)
            if saved is not None:
                write_json(saved, {"row": row, "predictions": preds})
        artifacts.append(row)
        all_preds += preds
    doc = summarize(p, artifacts, all_preds)
    if done is not None:
        shutil.rmtree(done, ignore_errors=True)
    return doc


def _replace_dir(staging: Path, final: Path) -> None:
    """`staging` becomes `final` (the good `final` is kept until the new one is in place)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def run(cfg: PipelineConfig, run_dir: RunDir) -> dict[str, Any]:
    """Into `RUN/.export.partial/`, renamed to `RUN/export/` when every artifact is written and
    measured: an interrupted export leaves the earlier one whole, and its rerun keeps the
    artifacts it finished (keyed by the stage's input fingerprint)."""
    final = run_dir.stage("export")
    staging = run_dir.root / f".{final.name}.partial"
    key = run_dir.manifest()["stages"].get("export", {}).get("input_fingerprint")
    if key is None:  # not run by the pipeline: nothing to match a staging directory against
        shutil.rmtree(staging, ignore_errors=True)
    doc = export_all(cfg, run_dir.stage("student"), staging, sft_dir=run_dir.stage("sft"),
                     run_dir=run_dir.root, name=final.name, resume_key=key)
    _replace_dir(staging, final)
    summary: dict[str, Any] = {"formats": ",".join(a["format"] for a in doc["artifacts"])}
    if doc.get("smallest"):
        summary |= {"smallest_format": doc["smallest"]["format"],
                    "smallest_bytes": doc["smallest"]["bytes"],
                    "smallest_ratio_vs_teacher": doc["smallest"]["ratio_vs_teacher"]}
    for a in doc["artifacts"]:
        if a["accuracy"] is not None:
            summary[f"{a['format']}_accuracy"] = a["accuracy"]
    return summary


# The pruning option recovers on sft/, so the training set is read too.
STAGE = Stage(name="export", run=run, sections=("export", "evaluate"), inputs=held_out_inputs,
              reads=("student/", "sft/sft.jsonl"))
