"""Big inputs stay bounded (issue #27): rows/s and peak RSS of loading seeds, the generate stage
and the filter stage at growing row counts, each size in a fresh process.

    python benchmarks/big_inputs.py                          # 10k, 100k (and 1M: --sizes)
    python benchmarks/big_inputs.py --sizes 10000 1000000 --phases filter

Inputs are procedural: seed i is "Tom has A apples and buys B more apples at the market. How
many apples does Tom have now?" (A, B from i; 5% of the seeds re-ask an earlier question with a
word changed, for the near-dedup pass). Phases:

- seeds: `load_config` + `load_seeds` of a jsonl of N seeds.
- generate: the generate stage (`distill.generate.stage.run`) on N seeds, one sample each, with
  an instant in-process teacher (answers "A + B = C. The answer is C." at no cost), so what is
  timed is the stage itself: jobs, the response cache, rows, the dataset and the jsonl.
- filter: the filter stage (`distill.filter.stage.run`) on N generation rows (the generate
  phase's file when it ran at that size, else written directly): errors, verify, decontamination
  against 200 held-out questions, exact and MinHash near dedup (numpy engine), then filtered/,
  sft/ and the sft formats.

Peak RSS is `resource.getrusage(RUSAGE_SELF).ru_maxrss` of the measuring process, imports
included ("base" is a process that only imports the stages). The last table gives each size's
rows/s and peak RSS against the smallest size's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

PIPELINE = """
name: big
seeds:
  path: data/seeds.jsonl
teacher:
  backend: openai
  model: instant
  base_url: http://127.0.0.1:9/v1
generate:
  prompt: prompts/cot.j2
  samples_per_prompt: 1
filter:
  verify: {{}}
  decontaminate: {{against: [data/test.jsonl]}}
  dedup: {{exact: true, near: {{}}, field: question}}
"""


def question(i: int) -> str:
    a, b = 3 + i % 997, 5 + i // 997
    if i % 20 == 19:  # a near copy of an earlier seed: one word changed
        a, b = 3 + (i - 7) % 997, 5 + (i - 7) // 997
        return (f"Tom has {a} apples and buys {b} more apples at the shop. How many apples does "
                "Tom have now?")
    return (f"Tom has {a} apples and buys {b} more apples at the market. How many apples does Tom "
            "have now?")


def gold(i: int) -> str:
    q = question(i).split()
    return str(int(q[2]) + int(q[6]))


def response(q: str) -> str:
    w = q.split()
    a, b = int(w[2]), int(w[6])
    return f"{a} + {b} = {a + b}. The answer is {a + b}."


def build(root: Path, n: int) -> None:
    """The project: pipeline, prompt, N seeds, 200 held-out questions."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "prompts").mkdir(exist_ok=True)
    (root / "prompts" / "cot.j2").write_text("{{ question }}\nLet's think step by step.")
    (root / "pipeline.yaml").write_text(PIPELINE.format())
    with open(root / "data" / "seeds.jsonl", "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"s{i}", "question": question(i), "answer": gold(i)})
                     + "\n")
    with open(root / "data" / "test.jsonl", "w") as fh:
        for k in range(200):  # every 5000th question is also a "test" one (contaminated)
            i = k * 5000 if k % 2 else 10**7 + k
            fh.write(json.dumps({"question": question(i), "answer": gold(i)}) + "\n")


def write_generations(root: Path, n: int) -> None:
    """N generation rows as the generate phase would write them (without running it)."""
    from distill.answers import parse_response
    from distill.io import write_stage
    from distill.records import make_generation_row

    rows: list[dict[str, Any]] = []
    for i in range(n):
        q = question(i)
        text = response(q)
        rows.append(dict(make_generation_row(
            seed_id=f"s{i}", sample=0, question=q, gold=gold(i),
            messages=[{"role": "user", "content": f"{q}\nLet's think step by step."}],
            teacher="openai:instant", parsed=parse_response(text), response=text,
            finish_reason="stop", prompt_tokens=30, completion_tokens=12)))
    write_stage(root / "run" / "generate", rows, "generations.jsonl")


class InstantTeacher:
    """A teacher that answers every arithmetic question at once, correctly, for free."""

    backend = "openai"
    model_id = "instant"

    async def stream(self, jobs: Sequence[Any]) -> AsyncIterator[Any]:
        from distill.teachers.base import Completion

        for job in jobs:
            text = response(job.messages[-1]["content"].split("\n")[0])
            for s in job.samples:
                yield job, s, Completion(text=text, finish_reason="stop", prompt_tokens=30,
                                         completion_tokens=12)

    def generate_batch(self, batch: Sequence[Any]) -> list[Any]:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


def measure(phase: str, root: Path) -> dict[str, Any]:
    """Run one phase in this process: rows, seconds, peak RSS."""
    from distill.config import load_config
    from distill.filter import stage as filter_stage
    from distill.generate import stage as gen_stage
    from distill.records import RunDir
    from distill.seeds import load_seeds

    cfg = load_config(root / "pipeline.yaml")
    run = RunDir(root / "run")
    run.root.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    if phase == "base":
        rows = 0
    elif phase == "seeds":
        rows = len(load_seeds(cfg))
    elif phase == "generate":
        gen_stage.make_teacher = lambda *a, **k: InstantTeacher()  # type: ignore[assignment]
        rows = gen_stage.run(cfg, run)["rows"]
    elif phase == "filter":
        if not (run.stage("generate") / "generations.jsonl").exists():
            write_generations(root, len((root / "data" / "seeds.jsonl").read_bytes().splitlines()))
            t0 = time.perf_counter()
        stats = filter_stage.run(cfg, run)
        rows = stats["in"]
        assert stats["kept"] > 0, stats
    else:
        raise SystemExit(f"unknown phase {phase}")
    seconds = time.perf_counter() - t0
    return {"phase": phase, "rows": rows, "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds) if rows else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--phases", nargs="+", default=["base", "seeds", "generate", "filter"])
    ap.add_argument("--one", nargs=2, metavar=("PHASE", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], Path(args.one[1]))))
        return
    results: list[dict[str, Any]] = []
    print(f"{'phase':<9} {'rows':>9} {'seconds':>8} {'rows/s':>9} {'peak RSS MB':>12}")
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix=f"big{n}-") as tmp:
            root = Path(tmp)
            build(root, n)
            for phase in args.phases:
                proc = subprocess.run([sys.executable, __file__, "--one", phase, str(root)],
                                      capture_output=True, text=True)
                if proc.returncode:
                    print(f"{phase} at {n}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1]) | {"n": n}
                results.append(r)
                print(f"{phase:<9} {n:>9,} {r['seconds']:>8} {r['rows_per_s'] or '-':>9} "
                      f"{r['peak_rss_mb']:>12}", flush=True)
    small = min(args.sizes)
    print(f"\nagainst {small:,} rows (rows/s ratio, peak RSS ratio):")
    for r in results:
        base = next((b for b in results if b["n"] == small and b["phase"] == r["phase"]), None)
        if base and r["n"] != small and base["rows_per_s"] and r["rows_per_s"]:
            speed = r["rows_per_s"] / base["rows_per_s"]
            print(f"  {r['phase']:<9} {r['n']:>9,}: rows/s x{speed:.2f}, "
                  f"peak RSS x{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
