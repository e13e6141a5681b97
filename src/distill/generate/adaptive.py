"""Adaptive rejection sampling for chain-of-thought: spend samples where they are needed.

A fixed `samples_per_prompt` pays as much for "2 + 3" as for the hardest question. Here every
seed is sampled in rounds until `k` of its rationales pass the filter's verify checks (the
gold answer, and faithfulness and step arithmetic when `filter.verify` asks for them;
`filter.verify.verify_row`) or `max_samples` were drawn:

    round 1       k samples of every seed
    round 2..R-1  seeds short of k: what their pass rate so far says they need
                  (need / rate), or twice what they had when nothing verified yet
    round R       seeds still short: everything left of max_samples

Every sample drawn becomes a row (the filter stage re-verifies them, so a failed sample is
dropped with its reason, not lost). Sample indices continue across rounds, so each (seed, sample)
has its own cache key: a rerun replays every round from the cache and sends nothing.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

from distill.answers import answers_match
from distill.config import AdaptiveConfig, PipelineConfig, VerifyConfig
from distill.filter.verify import verify_row
from distill.generate import batching, soft_targets
from distill.generate.cot import generation_row, sampling_params, structured_format
from distill.generate.templates import chat_messages
from distill.records import GenerationRow, RunDir
from distill.seeds import load_seeds
from distill.teachers import make_teacher
from distill.teachers.base import Job
from distill.teachers.cache import ResponseCache
from distill.teachers.engine import EngineStats, run_jobs


def samples_to_draw(a: AdaptiveConfig, round_: int, drawn: int, verified: int,
                    has_gold: bool = True) -> int:
    """How many more samples a seed gets in this (0-based) round."""
    left = a.max_samples - drawn
    need = a.k - verified
    if left <= 0 or need <= 0:
        return 0
    if round_ == 0:
        return min(a.k, left)
    if not has_gold:  # nothing to verify against: k samples, no more
        return 0
    if round_ >= a.rounds - 1:
        return left
    want = math.ceil(need * drawn / verified) if verified else max(drawn, 1) * 2
    return max(1, min(want, left))


def _verified(row: Mapping[str, Any], checks: VerifyConfig | None) -> bool:
    """Would the filter's verify step keep this sample? (Its gold answer alone without one.)"""
    if row.get("error"):
        return False
    if checks is None:
        return answers_match(row.get("answer"), row.get("gold"))
    # verify_row writes scores; the filter stage scores for real
    probe: dict[str, Any] = {**row, "scores": {}}
    return verify_row(probe, checks) is None and probe["scores"].get("verified") is True


def generate_adaptive(cfg: PipelineConfig, run_dir: RunDir
                      ) -> tuple[list[GenerationRow], dict[str, Any]]:
    """The adaptive generate stage: (a row for every sample drawn, stats for the manifest)."""
    a = cfg.generate.adaptive
    assert a is not None
    seeds = load_seeds(cfg)
    params = sampling_params(cfg)
    template = cfg.resolve(cfg.generate.prompt)
    fmt = structured_format(cfg)
    messages = {s["id"]: chat_messages(template, cfg.generate.system_prompt,
                                       question=s["question"]) for s in seeds}
    drawn: Counter[str] = Counter()
    verified: Counter[str] = Counter()
    solved_in: dict[str, int] = {}
    rows: list[GenerationRow] = []
    per_round: list[dict[str, Any]] = []
    total = EngineStats()
    teacher = make_teacher(cfg.teacher, batch_record=batching.record_path(run_dir),
                           **soft_targets.teacher_options(cfg))
    with ResponseCache(run_dir.cache) as cache:
        for r in range(a.rounds):
            jobs = []
            for s in seeds:
                n = samples_to_draw(a, r, drawn[s["id"]], verified[s["id"]],
                                    s.get("answer") is not None)
                if n:
                    start = drawn[s["id"]]
                    jobs.append(Job(key=s["id"], messages=messages[s["id"]], params=params,
                                    samples=list(range(start, start + n)), response_format=fmt))
            if not jobs or total.budget_stopped:
                break
            results, stats = run_jobs(
                teacher, jobs, cache, price_in=cfg.teacher.price_in_per_mtok,
                price_out=cfg.teacher.price_out_per_mtok,
                description=f"generate (adaptive round {r + 1}/{a.rounds})",
                need_logprobs=bool(soft_targets.kd_needs_stored(cfg)))
            total.add(stats)
            by_id = {s["id"]: s for s in seeds}
            n_ok = 0
            for job in jobs:
                seed = by_id[job.key]
                for i in job.samples:
                    row = generation_row(cfg, seed, job, i, results[(job.key, i)])
                    row["adaptive_round"] = r
                    ok = _verified(row, cfg.filter.verify)
                    n_ok += ok
                    verified[job.key] += ok
                    drawn[job.key] += 1
                    rows.append(row)
                if verified[job.key] >= a.k and job.key not in solved_in:
                    solved_in[job.key] = r
            soft_targets.enforce(cfg, rows)
            per_round.append({"round": r + 1, "seeds": len(jobs),
                              "samples": sum(len(j.samples) for j in jobs), "verified": n_ok,
                              "cost_usd": round(stats.cost_usd, 6)})
    for row in rows:
        row["seed_samples"] = drawn[row["seed_id"]]
    summary = adaptive_stats(a, seeds, drawn, verified, solved_in, per_round, total)
    return rows, summary | soft_targets.manifest_note(cfg, rows) | batching.stats(teacher)


def adaptive_stats(a: AdaptiveConfig, seeds: list[dict[str, Any]], drawn: Counter[str],
                   verified: Counter[str], solved_in: dict[str, int],
                   per_round: list[dict[str, Any]], total: EngineStats) -> dict[str, Any]:
    """What the sampling cost, per kept (verified) row and per seed."""
    gold = [s["id"] for s in seeds if s.get("answer") is not None]
    n_samples = sum(drawn.values())
    n_kept = sum(min(verified[i], a.k) for i in gold)
    hist = Counter(drawn[s["id"]] for s in seeds)
    hist_gold = Counter(drawn[i] for i in gold)
    return total.as_dict() | {
        "seeds": len(seeds),
        "adaptive": {
            "k": a.k, "max_samples": a.max_samples, "rounds": a.rounds,
            "rounds_run": len(per_round),
            "seeds_with_gold": len(gold),
            "seeds_solved": sum(verified[i] >= a.k for i in gold),
            "seeds_partial": sum(0 < verified[i] < a.k for i in gold),
            "seeds_unsolved": sum(verified[i] == 0 for i in gold),
            "samples": n_samples,
            "verified_samples": sum(verified[i] for i in gold),
            "kept_rows": n_kept,
            "samples_per_kept_row": round(n_samples / n_kept, 3) if n_kept else None,
            "cost_per_kept_row_usd": round(total.cost_usd / n_kept, 6) if n_kept else None,
            "samples_if_fixed": len(seeds) * a.max_samples,
            "per_round": per_round,
            "samples_per_seed_histogram": {str(k): hist[k] for k in sorted(hist)},
            "samples_per_seed_histogram_gold": {str(k): hist_gold[k] for k in sorted(hist_gold)},
            "solved_in_round_histogram": dict(sorted(Counter(
                str(r + 1) for r in solved_in.values()).items())),
        },
    }
