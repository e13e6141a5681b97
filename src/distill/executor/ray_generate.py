"""The generate stage on Ray: seeds split into shards, one Ray task per shard.

    <run>/shards/generate/of-<n>/<index>/
        seeds.jsonl     the shard's seeds (contiguous by seed index: `shard_ranges`)
        cache.sqlite    the shard's response cache (one writer: the task running the shard)
        rows.jsonl      its generation rows, written in one rename when the shard is done
        done.json       written after rows.jsonl: the shard's fingerprint and engine stats
        attempts.jsonl  one line per task attempt (host, pid): a retried shard shows it

A task runs the local code on its shard (the same jobs, the same row builder, the same adaptive
rounds), with its own cache file, so a rerun skips every shard whose done.json matches and,
inside an unfinished shard, sends only what its cache lacks. A worker killed mid-shard is retried
by Ray (`executor.max_retries`); the attempt that finishes writes the rows, so the merged rows
hold each (seed, sample) once, in the order the local path writes them.

Budgets and rate limits are per process in the teacher, so each task gets its share:
`max_cost_usd / shards`, requests and tokens per minute / the shards running at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.config import ConfigError, ExecutorConfig, PipelineConfig, SeedsConfig
from distill.executor import connect, shard_dir, shard_ranges, unwrap_task_error
from distill.executor.progress import ProgressBoard, Reporting, merge_stats, reporting_factory
from distill.generate import soft_targets
from distill.records import RunDir, fingerprint, now, read_jsonl, write_json, write_jsonl
from distill.seeds import load_seeds

STAGE = "generate"


@dataclass
class Shard:
    index: int
    dir: Path
    seeds: list[dict[str, Any]]
    fingerprint: str


def check_supported(cfg: PipelineConfig) -> None:
    """What a shard cannot do, said before anything runs."""
    if cfg.generate.task == "instruct":
        raise ConfigError("executor.kind: ray shards seeds (generate.task: cot); instruct grows "
                          "its instruction pool round by round in one process: use "
                          "executor.kind: local")
    if cfg.teacher.batch:
        raise ConfigError("teacher.batch: the Batch API job is already one remote job per run; "
                          "use it with executor.kind: local")


def generate(cfg: PipelineConfig, run_dir: RunDir) -> tuple[list[Any], dict[str, Any]]:
    """The cot / adaptive generate stage on the Ray cluster: (rows, stats for the manifest)."""
    check_supported(cfg)
    if cfg.teacher.backend == "vllm":
        from distill.executor.ray_vllm import generate_on_fleet

        return generate_on_fleet(cfg, run_dir)
    ray = connect(cfg.executor)
    seeds = load_seeds(cfg)
    shards = plan(cfg, run_dir, seeds)
    done = {s.index: finished(s) for s in shards}
    todo = [s for s in shards if done[s.index] is None]
    parallel = parallel_shards(ray, cfg.executor, len(shards))
    worker_cfg = shard_config(cfg, len(shards), parallel)
    per_seed = None if cfg.generate.adaptive else cfg.generate.samples_per_prompt
    total = None if per_seed is None else len(seeds) * per_seed
    skipped = [d for d in done.values() if d is not None]
    board = ProgressBoard(ray, "generate (ray)", total,
                          sum(s["rows"] for s in skipped) if per_seed else 0)
    token = uuid.uuid4().hex[:12]
    task = ray.remote(run_shard)
    stats: dict[int, dict[str, Any]] = {}
    pending: dict[Any, Shard] = {}
    queue = list(todo)
    try:
        with board:
            while queue or pending:
                while queue and len(pending) < parallel:
                    s = queue.pop(0)
                    ref = task.options(
                        name=f"generate-shard-{s.index}", max_retries=cfg.executor.max_retries,
                        retry_exceptions=False, num_cpus=cfg.executor.cpus_per_shard,
                        num_gpus=cfg.executor.gpus_per_shard,
                    ).remote(worker_cfg, str(s.dir), s.index, s.seeds, s.fingerprint, token,
                             board.actor)
                    pending[ref] = s
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.25)
                for ref in ready:
                    s = pending.pop(ref)
                    stats[s.index] = ray.get(ref)
                    board.finished(s.index, stats[s.index])
                board.refresh()
    except BaseException as err:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        raise unwrap_task_error(err) from None
    rows = merged_rows(cfg, shards, seeds)
    parts = [stats[s.index] if s.index in stats else as_skipped(done[s.index] or {})
             for s in shards]
    out = merge_stats(parts)
    out |= soft_targets.manifest_note(cfg, rows)
    out["executor"] = {
        "kind": "ray", "shards": len(shards), "shards_run": len(todo),
        "shards_skipped": len(shards) - len(todo), "parallel": parallel,
        "retried_shards": sum(st.get("attempts", 1) > 1 for st in stats.values()),
        "spent_this_run_usd": round(sum(st.get("cost_usd", 0.0) for st in stats.values()), 6),
        "dir": str(shard_dir(run_dir.root, STAGE, len(shards), 0).parent),
    }
    return rows, out


def plan(cfg: PipelineConfig, run_dir: RunDir, seeds: list[dict[str, Any]]) -> list[Shard]:
    """The shards of this run. A shard's fingerprint is the stage's (config, seeds file,
    prompt: `pipeline.input_fingerprint`) plus its place, so a done.json from another config
    or another grouping of the seeds is never taken for this one's."""
    from distill.pipeline import input_fingerprint

    base = input_fingerprint(STAGE, cfg, run_dir)
    ranges = shard_ranges(len(seeds), cfg.executor.shards)
    return [Shard(i, shard_dir(run_dir.root, STAGE, len(ranges), i), seeds[a:b],
                  fingerprint(base, i, len(ranges), a, b))
            for i, (a, b) in enumerate(ranges)]


def finished(s: Shard) -> dict[str, Any] | None:
    """The done.json of a shard finished with this fingerprint, else None."""
    marker = s.dir / "done.json"
    if not marker.exists() or not (s.dir / "rows.jsonl").exists():
        return None
    done: dict[str, Any] = json.loads(marker.read_text())
    return done if done.get("fingerprint") == s.fingerprint else None


def parallel_shards(ray: Any, ex: ExecutorConfig, n_shards: int) -> int:
    """Shard tasks at once: `executor.parallel`, else what the cluster holds now."""
    if ex.parallel:
        return min(ex.parallel, n_shards)
    res = ray.cluster_resources()
    fit = int(res.get("CPU", 1) // ex.cpus_per_shard)
    if ex.gpus_per_shard:
        fit = min(fit, int(res.get("GPU", 0) // ex.gpus_per_shard))
    return max(1, min(fit, n_shards))


def shard_config(cfg: PipelineConfig, n_shards: int, parallel: int) -> PipelineConfig:
    """The config a shard task runs: local executor, and its share of the teacher's budget
    and rate limits (each task's teacher enforces its own)."""
    t = cfg.teacher
    share: dict[str, Any] = {}
    if t.requests_per_minute:
        share["requests_per_minute"] = t.requests_per_minute / parallel
    if t.tokens_per_minute:
        share["tokens_per_minute"] = t.tokens_per_minute / parallel
    if t.max_cost_usd is not None:
        share["max_cost_usd"] = t.max_cost_usd / n_shards
    return cfg.model_copy(update={"teacher": t.model_copy(update=share),
                                  "executor": ExecutorConfig()})


def merged_rows(cfg: PipelineConfig, shards: list[Shard], seeds: list[dict[str, Any]]
                ) -> list[dict[str, Any]]:
    """Every shard's rows in the local path's order: seed order (shards are contiguous);
    adaptive rows by round first, as the local rounds append them."""
    rows = [r for s in shards for r in read_jsonl(s.dir / "rows.jsonl")]
    if cfg.generate.adaptive is not None:
        pos = {s["id"]: i for i, s in enumerate(seeds)}
        rows.sort(key=lambda r: (r.get("adaptive_round", 0), pos[r["seed_id"]], r["sample"]))
    return rows


def as_skipped(stats: dict[str, Any]) -> dict[str, Any]:
    """A finished shard's stats as this run saw them: every request came from its rows."""
    st = dict(stats.get("stats") or {})
    st["cached"] = st.get("requested", 0)
    for k in ("sent", "failed", "prompt_tokens", "completion_tokens", "cost_usd", "attempts"):
        st[k] = 0
    st["budget_stopped"] = False
    return st


# ----------------------------------------------------------------------------- in the task


def run_shard(cfg: PipelineConfig, where: str, index: int, seeds: list[dict[str, Any]],
              fp: str, token: str, board: Any) -> dict[str, Any]:
    """One shard, on a Ray worker: rows.jsonl, then done.json; its engine stats."""
    d = Path(where)
    d.mkdir(parents=True, exist_ok=True)
    attempts = log_attempt(d, token)
    marker = d / "done.json"
    if marker.exists() and (d / "rows.jsonl").exists():  # an earlier attempt got this far
        done = json.loads(marker.read_text())
        if done.get("fingerprint") == fp:
            return dict(done["stats"]) | {"attempts": attempts}
    write_jsonl(d / "seeds.jsonl", seeds)
    shard_cfg = cfg.model_copy(update={"seeds": SeedsConfig(
        path=str(d / "seeds.jsonl"), question_field="question", answer_field="answer",
        id_field="id", source=str(seeds[0].get("source") or "seeds"))})
    wrap = reporting_factory(board, index, cfg.teacher.price_in_per_mtok,
                             cfg.teacher.price_out_per_mtok)
    if cfg.generate.adaptive is not None:
        rows, stats = adaptive_shard(shard_cfg, RunDir(d), wrap)
    else:
        rows, stats = cot_shard(shard_cfg, RunDir(d), seeds, wrap)
    stats = {k: v for k, v in stats.items() if not k.startswith("soft_targets")}
    write_jsonl(d / "rows.jsonl", rows)
    write_json(marker, {"fingerprint": fp, "rows": len(rows), "stats": stats,
                        "finished": now()})
    return stats | {"attempts": attempts}


def log_attempt(d: Path, token: str) -> int:
    """Append this attempt (host, pid) to attempts.jsonl; this run's attempts so far."""
    line = {"run": token, "host": socket.gethostname(), "pid": os.getpid(), "at": now()}
    with open(d / "attempts.jsonl", "a") as fh:
        fh.write(json.dumps(line) + "\n")
    return sum(1 for r in read_jsonl(d / "attempts.jsonl") if r.get("run") == token)


def cot_shard(cfg: PipelineConfig, run_dir: RunDir, seeds: list[dict[str, Any]],
              wrap: Callable[[Any], Reporting]) -> tuple[list[Any], dict[str, Any]]:
    """The local cot branch of the generate stage on the shard's seeds and cache."""
    from distill.generate.cot import generate_cot
    from distill.teachers import make_teacher

    teacher = wrap(make_teacher(cfg.teacher, **soft_targets.teacher_options(cfg)))
    rows, stats = generate_cot(cfg, run_dir, teacher, seeds, show_progress=False)
    return list(rows), stats


def adaptive_shard(cfg: PipelineConfig, run_dir: RunDir, wrap: Callable[[Any], Reporting]
                   ) -> tuple[list[Any], dict[str, Any]]:
    """`generate_adaptive` on the shard: its rounds run per shard (a seed's samples depend on
    its own verified count only, so the rows are the local ones)."""
    from distill.generate import adaptive

    with teacher_wrapped(adaptive, wrap), contextlib.redirect_stdout(io.StringIO()):
        return adaptive.generate_adaptive(cfg, run_dir)


@contextlib.contextmanager
def teacher_wrapped(module: Any, wrap: Callable[[Any], Any]) -> Iterator[None]:
    """`module.make_teacher` returns wrapped teachers while inside (one task at a time runs in
    a Ray worker process). `generate_adaptive` builds its own teacher; this is how its
    completions reach the driver's bar, or how the vLLM fleet takes its place."""
    original = module.make_teacher
    module.make_teacher = lambda *a, **k: wrap(original(*a, **k))
    try:
        yield
    finally:
        module.make_teacher = original
