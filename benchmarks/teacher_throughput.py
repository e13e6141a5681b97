"""Throughput of the OpenAI-compatible teacher engine against a fixed-latency loopback server.

    .venv/bin/python benchmarks/teacher_throughput.py                  # 3,000 requests, 64 wide
    .venv/bin/python benchmarks/teacher_throughput.py -n 300 -c 16     # a quick one

The server (tests/fakeserver.py) runs in its own process and answers every chat request after
`--latency` seconds. Measured in the same run, in this order:

- bare:   `AsyncOpenAI.chat.completions.create` under an `asyncio.Semaphore` (the floor any
          client built on the SDK pays);
- engine: `run_jobs(OpenAITeacher)`: retries, rate/budget bookkeeping, replica pool, progress
          accounting, no cache; then again with a fresh sqlite cache (every completion written).

Reported: requests/s, the ratio to bare and to the ideal `concurrency / latency`, and client CPU
milliseconds per request (this process only; the server's CPU is not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(latency: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fakeserver.py"),
                             "--latency", str(latency)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{line.split()[1]}/v1"


def bare_client(url: str, n: int, concurrency: int) -> None:
    from openai import AsyncOpenAI

    async def go() -> None:
        client = AsyncOpenAI(base_url=url, api_key="bench", max_retries=0)
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem:
                await client.chat.completions.create(
                    model="fake-model", messages=[{"role": "user", "content": f"q{i}"}],
                    max_tokens=16, temperature=0.7)

        await asyncio.gather(*(one(i) for i in range(n)))
        await client.close()

    asyncio.run(go())


def engine(url: str, n: int, concurrency: int, cache_dir: Path | None) -> None:
    from distill.config import TeacherConfig
    from distill.teachers.base import Job, SamplingParams
    from distill.teachers.cache import ResponseCache
    from distill.teachers.engine import run_jobs
    from distill.teachers.openai_backend import OpenAITeacher

    cfg = TeacherConfig(backend="openai", model="fake-model", base_url=url, api_key_env=None,
                        max_concurrency=concurrency)
    params = SamplingParams(max_tokens=16, temperature=0.7)
    jobs = [Job(key=f"q{i}", messages=[{"role": "user", "content": f"q{i}"}], params=params,
                samples=[0]) for i in range(n)]
    cache = ResponseCache(cache_dir / f"cache-{time.time_ns()}.sqlite") if cache_dir else None
    results, stats = run_jobs(OpenAITeacher(cfg), jobs, cache, show_progress=False)
    if stats.failed or len(results) != n:
        raise RuntimeError(f"engine run failed: {stats}")
    if cache is not None:
        assert len(cache) == n
        cache.close()


def measure(fn: Callable[[], None]) -> tuple[float, float]:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall0, time.process_time() - cpu0


def main() -> None:
    parser = argparse.ArgumentParser(description="OpenAI teacher engine throughput")
    parser.add_argument("-n", "--requests", type=int, default=3000)
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.05, help="server latency, seconds")
    parser.add_argument("--repeat", type=int, default=1, help="best of this many runs each")
    args = parser.parse_args()
    n, c = args.requests, args.concurrency

    proc, url = start_server(args.latency)
    try:
        # Warm up imports, platform detection and the server before timing anything.
        bare_client(url, min(n, 2 * c), c)
        engine(url, min(n, 2 * c), c, None)
        with tempfile.TemporaryDirectory() as tmp:
            runs: dict[str, Callable[[], None]] = {
                "bare AsyncOpenAI + semaphore": lambda: bare_client(url, n, c),
                "engine: run_jobs(OpenAITeacher)": lambda: engine(url, n, c, None),
                "engine + fresh sqlite cache": lambda: engine(url, n, c, Path(tmp)),
            }
            best: dict[str, tuple[float, float]] = {}
            for _ in range(args.repeat):
                for name, fn in runs.items():
                    wall, cpu = measure(fn)
                    if name not in best or wall < best[name][0]:
                        best[name] = (wall, cpu)
    finally:
        proc.terminate()
        proc.wait(10)

    ideal = c / args.latency
    bare_rps = n / best["bare AsyncOpenAI + semaphore"][0]
    print(f"\n{n} requests, concurrency {c}, server latency {args.latency * 1000:.0f} ms, "
          f"ideal {ideal:.0f} req/s, {os.cpu_count()} CPUs, python {sys.version.split()[0]}\n")
    header = f"{'client':34} {'wall s':>7} {'req/s':>8} {'vs bare':>8} {'vs ideal':>9} " \
             f"{'CPU ms/req':>11}"
    print(header)
    print("-" * len(header))
    for name, (wall, cpu) in best.items():
        rps = n / wall
        print(f"{name:34} {wall:7.2f} {rps:8.0f} {rps / bare_rps:8.2f} {rps / ideal:9.2f} "
              f"{cpu * 1000 / n:11.3f}")


if __name__ == "__main__":
    main()
