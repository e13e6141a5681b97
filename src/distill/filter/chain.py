"""The filter chain: every row is kept or dropped with a reason; the funnel counts each filter.

Filters run cheapest first, each on the rows the previous ones kept:

    errors -> heuristics -> verify -> consistency -> decontaminate -> judge (paid calls) ->
    dedup exact -> near -> semantic (keeps each cluster's best-scored row) -> max_per_seed

Dedup comes after the judge so that a cluster can keep its best-judged row. Every row leaves
with `keep`, `drop_reason` ("<filter>: <reason>"), `scores` and `cluster_id`; the funnel is
{"in", "out", "filters": [{"name", "in", "out", "dropped": {reason: count}, "seconds"}]}.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from distill.config import PipelineConfig
from distill.filter.consistency import consistency_reasons
from distill.filter.decontam import decontam_reasons
from distill.filter.dedup import (
    dedup_text,
    exact_duplicate_labels,
    keep_best_of_clusters,
    near_duplicate_clusters,
    semantic_duplicate_clusters,
)
from distill.filter.heuristics import heuristic_reason
from distill.filter.judge import judge_reasons
from distill.filter.rows import quality_key, seed_of
from distill.filter.verify import verify_row
from distill.teachers.cache import ResponseCache

Rows = list[dict[str, Any]]


def _prepare(rows: Iterable[dict[str, Any]]) -> Rows:
    """Copies of the rows with the filter fields reset and a unique id on each."""
    out, seen = [], set()
    for i, row in enumerate(rows):
        r = dict(row)
        rid = r.get("id")
        if rid in (None, ""):
            sample = r.get("sample")
            rid = f"{r['seed_id']}-{sample}" if r.get("seed_id") and sample is not None else i
        rid, k = str(rid), 1
        while rid in seen:  # duplicate ids would make cluster_id ambiguous
            rid, k = f"{r.get('id') or rid}#{k}", k + 1
        seen.add(rid)
        r["id"] = rid
        r["keep"], r["drop_reason"], r["cluster_id"] = True, None, None
        r["scores"] = dict(r.get("scores") or {})
        out.append(r)
    return out


def _error_reason(row: dict[str, Any]) -> str | None:
    error = row.get("error")
    if not error:
        return None
    kind = str(error).split(":", 1)[0].strip()[:40]
    return f"teacher error ({kind})"


def _max_per_seed_reasons(rows: Rows, limit: int) -> list[str | None]:
    by_seed: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_seed[seed_of(row)].append(i)
    reasons: list[str | None] = [None] * len(rows)
    for members in by_seed.values():
        for i in sorted(members, key=lambda i: (quality_key(rows[i]), i))[limit:]:
            reasons[i] = "over max_per_seed"
    return reasons


def _resolve_cluster_ids(rows: Rows) -> None:
    """Passes chain (exact keeper later dropped by near): point every member at the final keeper."""
    by_id = {r["id"]: r for r in rows}
    for row in rows:
        cid, steps = row.get("cluster_id"), 0
        while cid is not None and cid in by_id and by_id[cid]["cluster_id"] != cid and steps < 16:
            cid, steps = by_id[cid]["cluster_id"], steps + 1
        row["cluster_id"] = cid


def filter_rows(rows: Iterable[dict[str, Any]], cfg: PipelineConfig,
                cache: ResponseCache | None = None) -> tuple[Rows, dict[str, Any]]:
    """Return all rows with keep / drop_reason / scores / cluster_id set, and the funnel."""
    fc = cfg.filter
    out = _prepare(rows)
    funnel: dict[str, Any] = {"in": len(out), "filters": []}

    def apply(name: str, reasons_of: Callable[[Rows], list[str | None]]) -> None:
        alive = [r for r in out if r["keep"]]
        t0 = time.perf_counter()
        reasons = reasons_of(alive) if alive else []
        dropped: Counter[str] = Counter()
        for r, reason in zip(alive, reasons, strict=True):
            if reason:
                r["keep"], r["drop_reason"] = False, f"{name}: {reason}"
                dropped[reason] += 1
        funnel["filters"].append({"name": name, "in": len(alive),
                                  "out": len(alive) - sum(dropped.values()),
                                  "dropped": dict(dropped),
                                  "seconds": round(time.perf_counter() - t0, 3)})

    apply("errors", lambda rs: [_error_reason(r) for r in rs])
    if fc.heuristics:
        hc = fc.heuristics
        apply("heuristics", lambda rs: [heuristic_reason(r, hc) for r in rs])
    voters = [r for r in out if r["keep"]]  # every sample with a usable response votes
    if fc.verify:
        vc, expected = fc.verify, cfg.generate.task == "cot"
        apply("verify", lambda rs: [verify_row(r, vc, answers_expected=expected) for r in rs])
    if fc.consistency:
        cc = fc.consistency
        apply("consistency", lambda rs: consistency_reasons(rs, voters, cc))
    if fc.decontaminate:
        dc = fc.decontaminate
        apply("decontaminate", lambda rs: decontam_reasons(rs, dc, cfg.resolve))
    if fc.judge:
        apply("judge", lambda rs: judge_reasons(rs, cfg, cache))
    if fc.dedup:
        dd = fc.dedup
        if dd.exact:
            apply("dedup.exact", lambda rs: keep_best_of_clusters(
                rs, exact_duplicate_labels([dedup_text(r, dd.field) for r in rs]),
                "exact duplicate"))
        if dd.near:
            nc = dd.near
            near: Callable[..., list[int]] = near_duplicate_clusters
            if cfg.executor.kind == "ray":  # Ray Data from executor.dedup_min_rows rows on
                from distill.executor.ray_dedup import near_clusters

                near = partial(near_clusters, executor=cfg.executor)
            apply("dedup.near", lambda rs: keep_best_of_clusters(
                rs, near([dedup_text(r, dd.field) for r in rs], nc.threshold,
                         nc.num_perm, nc.ngram, nc.backend),
                "near duplicate"))
        if dd.semantic:
            sc = dd.semantic
            apply("dedup.semantic", lambda rs: keep_best_of_clusters(
                rs, semantic_duplicate_clusters([dedup_text(r, sc.field) for r in rs], sc),
                "semantic duplicate"))
        _resolve_cluster_ids(out)
    if fc.max_per_seed:
        limit = fc.max_per_seed
        apply("max_per_seed", lambda rs: _max_per_seed_reasons(rs, limit))
    funnel["out"] = sum(r["keep"] for r in out)
    return out, funnel
