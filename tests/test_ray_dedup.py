"""Near-dedup on Ray Data gives the local numpy path's clusters (20k GSM8K-derived rows), and the
filter stage under `executor.kind: ray` keeps the same rows."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ray_fixture import ray_cluster  # noqa: E402

from distill.config import PipelineConfig  # noqa: E402
from distill.filter import dedup  # noqa: E402
from distill.filter.chain import filter_rows  # noqa: E402

__all__ = ["ray_cluster"]
pytestmark = pytest.mark.timeout(300)

TRAIN = next((p for p in (Path(__file__).resolve().parents[1] / "data" / "gsm8k" / "train.jsonl",
                          Path("/work/shared/data/gsm8k/train.jsonl")) if p.exists()), None)


@pytest.mark.skipif(TRAIN is None, reason="data/gsm8k/train.jsonl is missing")
def test_ray_data_near_dedup_gives_the_local_clusters_on_20k_rows(ray_cluster: Any) -> None:
    from benchmarks.dedup import build_corpus
    from distill.executor.ray_dedup import near_duplicate_clusters

    assert TRAIN is not None
    texts, truth = build_corpus(TRAIN, 20_000, 0.2, seed=0)
    # Texts without a shingle (never clustered) and non-ASCII ones take their own paths.
    texts += ["", "   ", "ok", "Ünïcode straße text with ß and more words here",
              "ÜNÏCODE STRASSE text with ss and more words here", texts[5].upper()]
    local = dedup.near_duplicate_clusters(texts, 0.55, 128, 2)
    on_ray = near_duplicate_clusters(texts, 0.55, 128, 2, blocks=4)
    assert on_ray == local
    assert len(set(local)) < len(texts) - 3000  # thousands of real clusters, not singletons
    assert on_ray[-1] == on_ray[5]


def test_pair_building_matches_the_local_bucket_rule() -> None:
    """The per-block bucket pairs are the local per-band pairs (before the Jaccard check)."""
    from distill.executor.ray_dedup import bucket_pairs

    rng = np.random.default_rng(0)
    keys = rng.integers(0, 5, size=(3, 40)).astype(np.uint64)  # 3 bands, 40 items, collisions
    ids = np.arange(40, dtype=np.int64)
    local = np.concatenate([dedup._bucket_pairs(k) for k in keys])
    band = np.repeat(np.arange(3, dtype=np.int16), 40)
    shuffled = rng.permutation(120)  # a block holds its rows in any order
    i, j = bucket_pairs(band[shuffled], keys.reshape(-1)[shuffled], np.tile(ids, 3)[shuffled])
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == sorted(map(tuple, local.tolist()))


def rows_with_copies(n: int) -> list[dict[str, Any]]:
    rng = random.Random(1)
    base = [f"Tom has {i} apples and buys {i + 3} more at the market near house number {i * 7}."
            f" How many apples does Tom have now in bag {i % 11}?" for i in range(n)]
    rows = []
    for k in range(2 * n):
        i = rng.randrange(n)
        q = base[i] if k < n else base[i].replace("Tom", "Tommy", 1)
        rows.append({"id": f"r{k}", "seed_id": f"s{i}", "sample": k, "question": q,
                     "response": f"{i} + {i + 3} = {2 * i + 3}", "answer": str(2 * i + 3),
                     "gold": str(2 * i + 3)})
    return rows


def test_filter_stage_on_ray_keeps_the_same_rows(ray_cluster: Any, tmp_path: Path) -> None:
    rows = rows_with_copies(150)

    def run(executor: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        cfg = PipelineConfig.model_validate({
            "name": "d", "root": str(tmp_path), "seeds": {"path": "seeds.jsonl"},
            "filter": {"verify": None, "dedup": {"exact": False, "near": True,
                                                 "field": "question"}},
            "executor": executor})
        return filter_rows([dict(r) for r in rows], cfg)

    local, funnel = run({"kind": "local"})
    on_ray, ray_funnel = run({"kind": "ray", "dedup_min_rows": 0, "dedup_blocks": 3})
    keep = [(r["id"], r["keep"], r["drop_reason"], r["cluster_id"]) for r in local]
    assert keep == [(r["id"], r["keep"], r["drop_reason"], r["cluster_id"]) for r in on_ray]
    assert funnel["out"] == ray_funnel["out"] < len(rows) // 2
