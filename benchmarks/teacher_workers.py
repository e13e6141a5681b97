"""CPU generation with the local transformers teacher: one process vs `teacher.workers` processes.

    .venv/bin/python benchmarks/teacher_workers.py                 # demo teacher, 500 questions
    .venv/bin/python benchmarks/teacher_workers.py -n 1000 --workers 2

Both runs sample the same arithmetic train questions with the demo's settings (batch 125,
static KV cache, top-8 logprobs, temperature 0.7) and every core of this machine: the baseline
is one process using all of torch's threads, the other `--workers` processes with an equal share
each. Reported: completions/s of each and their ratio, and how many texts match (each batch is
seeded by its first job, so they should all match up to float rounding between thread counts).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from distill.config import TeacherConfig
from distill.generate.templates import chat_messages
from distill.tasks import make_task
from distill.teachers.base import Job, SamplingParams
from distill.teachers.transformers_backend import TransformersTeacher


async def run(cfg: TeacherConfig, jobs: list[Job]) -> tuple[float, dict[str, str]]:
    teacher = TransformersTeacher(cfg)
    t0 = time.perf_counter()
    texts = {job.key: comp.text async for job, _, comp in teacher.stream(jobs)}
    wall = time.perf_counter() - t0
    await teacher.aclose()
    return wall, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=500, help="questions")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default="data/models/demo-teacher")
    args = ap.parse_args()
    params = SamplingParams(temperature=0.7, max_tokens=96, seed=0, top_logprobs=8)
    prompt = "prompts/cot.j2"
    jobs = [Job(key=r["id"], messages=chat_messages(prompt, None, question=r["question"]),
                params=params, samples=[0]) for r in make_task("arithmetic", "train", args.n, 7)]
    base = dict(backend="transformers", model=args.model, device="cpu", dtype="float32",
                batch_size=125, kv_cache="static")
    t1, one = asyncio.run(run(TeacherConfig(**base), jobs))
    tn, many = asyncio.run(run(TeacherConfig(**base, workers=args.workers), jobs))
    same = sum(one[k] == many[k] for k in one)
    print(f"one process       : {t1:6.1f} s  {len(jobs) / t1:6.1f} completions/s")
    print(f"{args.workers} worker processes: {tn:6.1f} s  {len(jobs) / tn:6.1f} completions/s "
          f"(includes spawning them and loading the model in each)")
    print(f"speed-up: {t1 / tn:.2f}x   identical texts: {same}/{len(jobs)}")


if __name__ == "__main__":
    main()
