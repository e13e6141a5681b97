"""The evaluate stage: teacher vs base student vs trained students on the same held-out set.

Every model gives one greedy answer per item (`accuracy`, what a user expects the word to mean)
and, with `evaluate.samples` = n > 1, n sampled answers at `evaluate.temperature` for pass@k and
maj@k. All answers land in `evaluate/predictions.jsonl` (`mode`: greedy / sampled); metrics.json
adds paired comparisons, per-template / per-difficulty accuracy and lm-evaluation-harness scores.

The teacher answers through the run's cache, the students through `evaluate/answers.sqlite`
(`distill.evaluate.answer_cache`): a killed evaluate regenerates none of the answers it has.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill.answers import parse_response, score
from distill.config import ConfigError, PipelineConfig, TeacherConfig
from distill.evaluate import answer_cache
from distill.evaluate.answer_cache import Identified, base_identity, trained_identity
from distill.evaluate.breakdown import item_groups
from distill.evaluate.compare import comparison_metrics
from distill.evaluate.harness import HarnessRunner
from distill.evaluate.metrics import (
    accuracy,
    bootstrap_ci,
    gap_closed,
    majority_vote,
    mean_pass_at_k,
)
from distill.export.files import dir_params
from distill.generate.templates import chat_messages
from distill.records import RunDir, write_json, write_jsonl
from distill.seeds import load_eval_set
from distill.stages import Stage
from distill.teachers import make_teacher
from distill.teachers.base import Job, SamplingParams
from distill.teachers.cache import ResponseCache
from distill.teachers.engine import run_jobs
from distill.teachers.transformers_backend import TransformersTeacher, load_causal_lm


def dir_bytes(path: Path) -> int:
    """Bytes of the model's weight files: the directory's own safetensors, not an `adapter/`
    kept beside a merged student (that counted the LoRA weights twice: 557.7 vs 538.1 MB)."""
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) if path.is_dir() else 0


SAMPLED = "#sampled"
"""Job-key suffix of the sampled answers (the greedy answer keeps the bare item id)."""


def sample_temperature(cfg: PipelineConfig) -> float:
    """evaluate.temperature, else generate.temperature (what evaluate used before it had one)."""
    assert cfg.evaluate is not None
    t = cfg.evaluate.temperature
    return cfg.generate.temperature if t is None else t


def check_sampling(cfg: PipelineConfig) -> None:
    """samples > 1 at temperature 0 would be n copies of the greedy answer: pass@k = maj@k =
    accuracy, a table that looks informative and is not."""
    assert cfg.evaluate is not None
    if cfg.evaluate.samples > 1 and sample_temperature(cfg) <= 0:
        raise ConfigError(f"evaluate.samples: {cfg.evaluate.samples} samples at temperature 0 "
                          "are copies of the greedy answer; set evaluate.temperature > 0")


def eval_jobs(cfg: PipelineConfig, items: list[dict[str, Any]], temperature: float = 0.0,
              samples: int = 1, suffix: str = "") -> list[Job]:
    """One job per item: `samples` answers at `temperature` (0: greedy), keyed id + suffix."""
    assert cfg.evaluate is not None
    params = SamplingParams(temperature=temperature, top_p=1.0,
                            max_tokens=cfg.evaluate.max_tokens, seed=cfg.seed)
    prompt = cfg.resolve(cfg.generate.prompt)
    return [Job(key=it["id"] + suffix, messages=chat_messages(prompt, cfg.generate.system_prompt,
                                                              question=it["question"]),
                params=params, samples=list(range(samples))) for it in items]


def all_jobs(cfg: PipelineConfig, items: list[dict[str, Any]]) -> list[Job]:
    """The greedy answer to every item (what `accuracy` reports, and the same request, hence
    the same cache entry, as a samples: 1 run), then `evaluate.samples` sampled answers when
    that is > 1 (pass@k, maj@k). One engine call, so a local model batches both."""
    assert cfg.evaluate is not None
    jobs = eval_jobs(cfg, items)
    if cfg.evaluate.samples > 1:
        jobs += eval_jobs(cfg, items, sample_temperature(cfg), cfg.evaluate.samples, SAMPLED)
    return jobs


def prediction_row(name: str, it: dict[str, Any], mode: str, s: int, comp: Any,
                   groups: dict[str, Any]) -> dict[str, Any]:
    """One line of predictions.jsonl: an answer, its parse and its grade."""
    pred = parse_response(comp.text, comp.reasoning)["answer"] if not comp.error else None
    correct = not comp.error and score(comp.text, it["answer"], reasoning=comp.reasoning)
    return {"model": name, "id": it["id"], "mode": mode, "sample": s,
            "question": it["question"], "gold": it["answer"], "response": comp.text,
            "prediction": pred, "correct": correct,
            "completion_tokens": comp.completion_tokens, "latency_s": round(comp.latency_s, 5),
            "error": comp.error} | groups


def sampled_summary(preds: list[dict[str, Any]], n: int, temperature: float
                    ) -> dict[str, Any]:
    """pass@k (unbiased, averaged over items) and maj@k (majority of the first k samples; see
    `majority_vote` for ties) for k = 1 and k = n, keys as strings (JSON)."""
    by_item: dict[str, list[dict[str, Any]]] = {}
    for p in preds:
        if p["mode"] == "sampled":
            by_item.setdefault(p["id"], []).append(p)
    rows = [sorted(r, key=lambda p: p["sample"]) for r in by_item.values()]
    ks = sorted({1, n})
    return {"samples": n, "temperature": temperature,
            "pass_at_k": {str(k): round(mean_pass_at_k([[p["correct"] for p in r] for r in rows],
                                                       k), 4) for k in ks},
            "maj_at_k": {str(k): round(maj_accuracy(rows, k), 4) for k in ks}}


def maj_accuracy(rows: list[list[dict[str, Any]]], k: int) -> float:
    """Share of items whose majority answer among samples 0..k-1 is correct (no answer: wrong)."""
    if not rows:
        return 0.0
    hits = 0
    for r in rows:
        i = majority_vote([p["prediction"] for p in r[:k]])
        hits += i is not None and bool(r[i]["correct"])
    return hits / len(rows)


def on_executor(cfg: PipelineConfig, teacher: Any) -> Any:
    """The model as the stage runs it: itself, or (`executor.kind: ray`) its held-out items in
    shards on a Ray cluster (`distill.executor.ray_evaluate`)."""
    if cfg.executor.kind != "ray":
        return teacher
    from distill.executor.ray_evaluate import on_ray

    return on_ray(cfg, teacher, lambda key: key.removesuffix(SAMPLED))


def score_model(name: str, teacher: Any, cfg: PipelineConfig, items: list[dict[str, Any]],
                cache: ResponseCache | None, groups: list[dict[str, Any]] | None = None
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy accuracy (+ CI) and, with evaluate.samples > 1, pass@k / maj@k of one model;
    and every answer as a prediction row (mode greedy / sampled, with the item's groups)."""
    assert cfg.evaluate is not None
    jobs = all_jobs(cfg, items)
    t0 = time.perf_counter()
    results, stats = run_jobs(teacher, jobs, cache, description=f"evaluate {name}")
    wall = time.perf_counter() - t0
    n = len(items)
    # The speeds are those of the answers generated now (None: all came from a cache), not of
    # the cached ones: a resumed run times only the rest.
    made = stats.sent / stats.requested if stats.requested else 0.0
    groups = groups or [{} for _ in items]
    preds = [prediction_row(name, items[j % n], "greedy" if j < n else "sampled", s,
                            results[(job.key, s)], groups[j % n])
             for j, job in enumerate(jobs) for s in job.samples]
    greedy = [p["correct"] for p in preds if p["mode"] == "greedy"]
    summary = {
        "accuracy": round(accuracy(greedy), 4),
        "ci": bootstrap_ci(greedy, cfg.evaluate.bootstrap, seed=cfg.seed),
        "n": n,
        "latency_per_answer_s": round(wall / max(stats.sent, 1), 5) if stats.sent else None,
        "tokens_per_s": round(stats.completion_tokens / wall, 1)
        if stats.sent and wall > 0 else None,
        "items_per_s": round(n * made / wall, 2) if stats.sent and wall > 0 else None,
    }
    if cfg.evaluate.samples > 1:
        summary |= sampled_summary(preds, cfg.evaluate.samples, sample_temperature(cfg))
    return summary, preds


def local(model_dir: Path, batch_size: int, model: Any = None, tok: Any = None) -> Any:
    tcfg = TeacherConfig(backend="transformers", model=str(model_dir), batch_size=batch_size,
                         device="cpu")
    return make_teacher(tcfg, model=model, tokenizer=tok) if model is not None else make_teacher(
        tcfg)


class Evaluation:
    """What the stage gathers as it goes: per-model summaries, every answer, harness scores."""

    def __init__(self, cfg: PipelineConfig, run_dir: RunDir) -> None:
        assert cfg.evaluate is not None
        check_sampling(cfg)
        self.cfg, self.e = cfg, cfg.evaluate
        self.out = run_dir.stage("evaluate")
        self.out.mkdir(parents=True, exist_ok=True)
        # Before any model is scored: a missing lm-eval, task or data file fails in seconds.
        self.harness = HarnessRunner(cfg, self.out) if self.e.harness is not None else None
        self.items = load_eval_set(cfg)
        self.groups = item_groups(cfg, len(self.items))
        self.models: dict[str, dict[str, Any]] = {}
        self.preds: list[dict[str, Any]] = []
        self.harness_skipped: dict[str, str] = {}
        self.answers = self.out / answer_cache.FILE

    def score(self, name: str, teacher: Any, cache: ResponseCache | None = None, *,
              identity: str | None = None, **extra: Any) -> None:
        """Score one model: through `cache`, or with `identity` (what the model is: see
        `answer_cache`) through the stage's own answer cache under that model id."""
        model = on_executor(self.cfg, teacher)
        if identity is None:
            summary, preds = score_model(name, model, self.cfg, self.items, cache, self.groups)
        else:
            with ResponseCache(self.answers) as answers:
                summary, preds = score_model(name, Identified(model, identity), self.cfg,
                                             self.items, answers, self.groups)
        self.models[name] = summary | extra
        self.preds.extend(preds)

    def run_harness(self, name: str, load: Callable[[], tuple[Any, Any]]) -> None:
        """The harness tasks on one model (`load` gives model and tokenizer, only when run)."""
        if self.harness is not None:
            self.harness.run(name, *load())

    def metrics(self, train_entry: dict[str, Any]) -> dict[str, Any]:
        e = self.e
        m = flat_metrics(self.models, len(self.items))
        m |= comparison_metrics(self.models, self.preds, e.bootstrap, self.cfg.seed)
        m["harness"] = self.harness.scores if self.harness is not None else {}
        if self.harness is not None:
            m["harness_info"] = self.harness.info | {"skipped": self.harness_skipped}
        # Learning-curve summary (dev set, see train.dev): steps each student took to reach the
        # CoT student's final dev accuracy.
        for key in ("dev_target", "steps_to_dev_target"):
            if key in train_entry:
                m[key] = train_entry[key]
        return m


def loaded(teacher: Any, tcfg: TeacherConfig, cfg: PipelineConfig) -> tuple[Any, Any]:
    """Model and tokenizer of a local model: the one already in memory, else loaded (every
    answer came from the cache, or from worker processes)."""
    if getattr(teacher, "model", None) is not None:
        return teacher.model, teacher.tokenizer
    name = str(cfg.resolve(tcfg.model)) if cfg.resolve(tcfg.model).exists() else tcfg.model
    return load_causal_lm(name, trust_remote_code=tcfg.trust_remote_code,
                          allow_pickle=tcfg.allow_pickle, dtype=tcfg.dtype,
                          device=tcfg.device)


def eval_teacher(ev: Evaluation, run_dir: RunDir) -> None:
    from distill.train.student import count_params

    cfg = ev.cfg
    teacher_cfg = cfg.teacher.model_copy(update={"batch_size": ev.e.batch_size})
    teacher = make_teacher(teacher_cfg)
    params, nbytes = None, None
    with ResponseCache(run_dir.cache) as cache:
        summary, preds = score_model("teacher", on_executor(cfg, teacher), cfg, ev.items,
                                     cache, ev.groups)
    if isinstance(teacher, TransformersTeacher):
        # Every answer may have come from the cache, with the model never loaded.
        params = (count_params(teacher.model) if teacher.model is not None
                  else dir_params(cfg.resolve(cfg.teacher.model)))
        nbytes = dir_bytes(cfg.resolve(cfg.teacher.model))
    ev.models["teacher"] = summary | {"params": params, "bytes": nbytes}
    ev.preds.extend(preds)
    if cfg.teacher.backend == "transformers":
        ev.run_harness("teacher", lambda: loaded(teacher, teacher_cfg, cfg))
    elif ev.harness is not None:
        ev.harness_skipped["teacher"] = (f"teacher.backend {cfg.teacher.backend}: the harness "
                                         "runs local transformers models only")


def eval_base(ev: Evaluation) -> None:
    """The base student: what the student was before training (fresh init or pretrained)."""
    from distill.train.student import build_student, count_params, load_tokenizer

    cfg = ev.cfg
    tok = load_tokenizer(cfg)
    base = build_student(cfg, tok)
    base_dir = cfg.resolve(cfg.train.student) if cfg.train.student else None
    ev.score("base_student", local(Path("base"), ev.e.batch_size, base, tok),
             identity=base_identity(base, tok), params=count_params(base),
             bytes=dir_bytes(base_dir) if base_dir is not None and base_dir.is_dir() else None)
    ev.run_harness("base_student", lambda: (base, tok))


def eval_trained(ev: Evaluation, run_dir: RunDir, train_entry: dict[str, Any]) -> None:
    trained = train_entry.get("students") or {"student": {"dir": "student"}}
    for name, info in trained.items():
        mdir = run_dir.root / info["dir"]
        if not (mdir / "config.json").exists():
            continue
        t = local(mdir, ev.e.batch_size)
        ev.score(name, t, identity=trained_identity(run_dir.root, mdir),
                 params=info.get("params"), bytes=dir_bytes(mdir),
                 train_s=info.get("train_s"), steps=info.get("steps"))
        ev.run_harness(name, functools.partial(loaded, t, t.cfg, ev.cfg))


def run(cfg: PipelineConfig, run_dir: RunDir) -> dict[str, Any]:
    ev = Evaluation(cfg, run_dir)
    if ev.e.evaluate_teacher:
        eval_teacher(ev, run_dir)
    eval_base(ev)
    train_entry = run_dir.manifest()["stages"].get("train") or {}
    eval_trained(ev, run_dir, train_entry)
    metrics = ev.metrics(train_entry)
    write_jsonl(ev.out / "predictions.jsonl", ev.preds)
    write_json(ev.out / "metrics.json", metrics)
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


def held_out_inputs(cfg: PipelineConfig) -> list[tuple[str, str | None]]:
    """Evaluate and export both put the held-out questions to models through the generation
    prompt."""
    return [("generate.prompt", cfg.generate.prompt),
            ("evaluate.dataset", cfg.evaluate.dataset if cfg.evaluate else None)]


STAGE = Stage(
    name="evaluate", run=run, sections=("evaluate", "teacher", "train", "generate.prompt"),
    inputs=held_out_inputs, reads=("student*/",),
    teachers=lambda cfg: [("teacher", cfg.teacher)]
    if cfg.evaluate is not None and cfg.evaluate.evaluate_teacher else [],
    models=lambda cfg: [("train.student", cfg.train.student, "model")])
