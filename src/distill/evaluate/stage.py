"""The evaluate stage: teacher vs base student vs trained students on the same held-out set."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from distill.config import PipelineConfig, TeacherConfig
from distill.evaluate.metrics import accuracy, bootstrap_ci, gap_closed
from distill.filter.verify import answers_match
from distill.generate.parse import parse_response
from distill.generate.templates import chat_messages
from distill.records import RunDir, write_json, write_jsonl
from distill.seeds import load_eval_set
from distill.teachers import make_teacher
from distill.teachers.base import Job, SamplingParams
from distill.teachers.cache import ResponseCache
from distill.teachers.engine import run_jobs


def dir_bytes(path: Path) -> int:
    """Bytes of the model's weight files: the directory's own safetensors, not an `adapter/`
    kept beside a merged student (that counted the LoRA weights twice: 557.7 vs 538.1 MB)."""
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) if path.is_dir() else 0


def dir_params(path: Path) -> int | None:
    """Parameters in a model directory, read from the safetensors headers (no weights loaded;
    tied embeddings are stored once, as `count_params` counts them)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            total += sum(math.prod(fh.get_slice(k).get_shape())
                         for k in fh.keys())  # noqa: SIM118 - safe_open has no __iter__
    return total


def eval_jobs(cfg: PipelineConfig, items: list[dict[str, Any]], temperature: float = 0.0
              ) -> list[Job]:
    assert cfg.evaluate is not None
    e = cfg.evaluate
    params = SamplingParams(temperature=temperature if e.samples > 1 else 0.0, top_p=1.0,
                            max_tokens=e.max_tokens, seed=cfg.seed)
    prompt = cfg.resolve(cfg.generate.prompt)
    return [Job(key=it["id"], messages=chat_messages(prompt, cfg.generate.system_prompt,
                                                     question=it["question"]),
                params=params, samples=list(range(e.samples))) for it in items]


def score_model(name: str, teacher: Any, cfg: PipelineConfig, items: list[dict[str, Any]],
                cache: ResponseCache | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    assert cfg.evaluate is not None
    jobs = eval_jobs(cfg, items, temperature=cfg.generate.temperature)
    t0 = time.perf_counter()
    results, stats = run_jobs(teacher, jobs, cache, description=f"evaluate {name}")
    wall = time.perf_counter() - t0
    preds, correct = [], []
    for it, job in zip(items, jobs, strict=True):
        for s in job.samples:
            comp = results[(job.key, s)]
            pred = parse_response(comp.text, comp.reasoning)["answer"] if not comp.error else None
            ok = answers_match(pred, it["answer"])
            correct.append(ok)
            preds.append({"model": name, "id": it["id"], "sample": s, "question": it["question"],
                          "gold": it["answer"], "response": comp.text, "prediction": pred,
                          "correct": ok, "completion_tokens": comp.completion_tokens,
                          "latency_s": round(comp.latency_s, 5), "error": comp.error})
    n_sent = max(stats.sent, 1)
    toks = sum(p["completion_tokens"] for p in preds)
    summary = {
        "accuracy": round(accuracy(correct), 4),
        "ci": bootstrap_ci(correct, cfg.evaluate.bootstrap, seed=cfg.seed),
        "n": len(correct),
        "latency_per_answer_s": round(wall / n_sent, 5) if stats.sent else None,
        "tokens_per_s": round(toks / wall, 1) if stats.sent and wall > 0 else None,
    }
    return summary, preds


def local(model_dir: Path, batch_size: int, model: Any = None, tok: Any = None) -> Any:
    tcfg = TeacherConfig(backend="transformers", model=str(model_dir), batch_size=batch_size,
                         device="cpu")
    return make_teacher(tcfg, model=model, tokenizer=tok) if model is not None else make_teacher(
        tcfg)


def run(cfg: PipelineConfig, run_dir: RunDir) -> dict[str, Any]:
    from distill.train.student import build_student, count_params, load_tokenizer

    assert cfg.evaluate is not None
    e = cfg.evaluate
    items = load_eval_set(cfg)
    models: dict[str, dict[str, Any]] = {}
    all_preds: list[dict[str, Any]] = []

    def record(name: str, summary: dict[str, Any], preds: list[dict[str, Any]], **extra: Any
               ) -> None:
        models[name] = summary | extra
        all_preds.extend(preds)

    if e.evaluate_teacher:
        cache = ResponseCache(run_dir.cache)
        teacher_cfg = cfg.teacher.model_copy(update={"batch_size": e.batch_size})
        teacher = make_teacher(teacher_cfg)
        summary, preds = score_model("teacher", teacher, cfg, items, cache)
        cache.close()
        params, nbytes = None, None
        if cfg.teacher.backend == "transformers":
            # Every answer may have come from the cache, with the model never loaded.
            params = (count_params(teacher.model) if teacher.model is not None
                      else dir_params(cfg.resolve(cfg.teacher.model)))
            nbytes = dir_bytes(cfg.resolve(cfg.teacher.model))
        record("teacher", summary, preds, params=params, bytes=nbytes)

    # The base student: what the student was before training (fresh init or pretrained weights).
    tok = load_tokenizer(cfg)
    base = build_student(cfg, tok)
    summary, preds = score_model("base_student", local(Path("base"), e.batch_size, base, tok),
                                 cfg, items, None)
    base_dir = cfg.resolve(cfg.train.student) if cfg.train.student else None
    record("base_student", summary, preds, params=count_params(base),
           bytes=dir_bytes(base_dir) if base_dir is not None and base_dir.is_dir() else None)
    del base

    train_entry = run_dir.manifest()["stages"].get("train") or {}
    trained = train_entry.get("students") or {"student": {"dir": "student"}}
    for name, info in trained.items():
        mdir = run_dir.root / info["dir"]
        if not (mdir / "config.json").exists():
            continue
        summary, preds = score_model(name, local(mdir, e.batch_size), cfg, items, None)
        record(name, summary, preds, params=info.get("params"), bytes=dir_bytes(mdir),
               train_s=info.get("train_s"), steps=info.get("steps"))

    metrics = flat_metrics(models, len(items))
    # Learning-curve summary (dev set, see train.dev): steps each student took to reach the CoT
    # student's final dev accuracy.
    for key in ("dev_target", "steps_to_dev_target"):
        if key in train_entry:
            metrics[key] = train_entry[key]
    out = run_dir.stage("evaluate")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "predictions.jsonl", all_preds)
    write_json(out / "metrics.json", metrics)
    return {k: v for k, v in metrics.items() if not isinstance(v, dict)}


def flat_metrics(models: dict[str, dict[str, Any]], n_eval: int) -> dict[str, Any]:
    """metrics.json: DESIGN.md's flat keys, plus the full per-model table under `models`."""
    names = {"teacher": "teacher", "student": "student", "base_student": "base_student",
             "label_only": "label_only", "kd": "kd", "gkd": "gkd"}
    m: dict[str, Any] = {"n_eval": n_eval}
    for name, key in names.items():
        if name in models:
            m[f"{key}_accuracy"] = models[name]["accuracy"]
            m[f"{key}_accuracy_ci"] = models[name]["ci"]
    m["teacher_params"] = models.get("teacher", {}).get("params")
    m["student_params"] = models.get("student", {}).get("params")
    if "teacher" in models and "student" in models:
        t, s = models["teacher"]["accuracy"], models["student"]["accuracy"]
        m["student_to_teacher_ratio"] = round(s / t, 4) if t else None
        m["gap_closed"] = gap_closed(s, models.get("base_student", {}).get("accuracy", 0.0), t)
        if m["teacher_params"] and m["student_params"]:
            m["compression_ratio"] = round(m["teacher_params"] / m["student_params"], 2)
    if "student" in models and "label_only" in models:
        m["cot_minus_label_only"] = round(models["student"]["accuracy"]
                                          - models["label_only"]["accuracy"], 4)
    m["models"] = models
    return m
