"""Near-dedup throughput: the local numpy MinHash LSH vs the same algorithm on Ray Data.

    python benchmarks/dedup_ray.py                       # 20k and 100k rows, Ray with 2 CPUs
    python benchmarks/dedup_ray.py --rows 20000 --cpus 2 --blocks 4

Corpus: `benchmarks/dedup.py`'s (GSM8K questions, spliced originals, 20% planted near-copies).
Each size runs the local path once and the Ray path once (after a small warm-up job, so worker
start-up and imports are not counted; the Ray instance's own start is printed apart), and
checks that both give the same clusters. Settings: word bigrams at 0.55, 128 permutations (the
filter's defaults). On one small machine Ray Data can only lose: the point is what a job costs
here, and that it gives the same answer; the README has the plan for 100M rows on N nodes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from dedup import DEFAULT_DATA, build_corpus  # noqa: E402

from distill.executor.ray_dedup import near_duplicate_clusters as ray_clusters  # noqa: E402
from distill.filter.dedup import near_duplicate_clusters  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[20_000, 100_000])
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--blocks", type=int, default=None,
                    help="blocks and shuffle partitions (default: 2 per CPU)")
    ap.add_argument("--threshold", type=float, default=0.55)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--ngram", type=int, default=2)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = ap.parse_args()

    import ray
    from ray.data import DataContext

    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
    DataContext.get_current().enable_progress_bars = False
    print(f"ray.init: {time.perf_counter() - t0:.1f} s ({args.cpus} CPUs)")
    blocks = args.blocks or 2 * args.cpus
    warm, _ = build_corpus(args.data, 2_000, 0.2, seed=1)
    ray_clusters(warm, args.threshold, args.num_perm, args.ngram, blocks)  # workers started
    for n in args.rows:
        texts, _ = build_corpus(args.data, n, 0.2, seed=0)
        t0 = time.perf_counter()
        local = near_duplicate_clusters(texts, args.threshold, args.num_perm, args.ngram)
        t_local = time.perf_counter() - t0
        t0 = time.perf_counter()
        on_ray = ray_clusters(texts, args.threshold, args.num_perm, args.ngram, blocks)
        t_ray = time.perf_counter() - t0
        same = "same clusters" if on_ray == local else "CLUSTERS DIFFER"
        print(f"{n:>9,} rows: local numpy {t_local:6.2f} s ({n / t_local:8,.0f} rows/s) | "
              f"ray data {args.cpus} CPUs, {blocks} blocks {t_ray:6.2f} s "
              f"({n / t_ray:8,.0f} rows/s) | {len(set(local)):,} clusters, {same}")
    ray.shutdown()


if __name__ == "__main__":
    main()
