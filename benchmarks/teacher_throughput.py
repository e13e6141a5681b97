"""Throughput of the OpenAI-compatible teacher engine against a fixed-latency loopback server.

    .venv/bin/python benchmarks/teacher_throughput.py                  # 3,000 requests, 64 wide
    .venv/bin/python benchmarks/teacher_throughput.py -n 300 -c 16     # a quick one

The server (tests/fakeserver.py) runs in its own process and answers every chat request after
`--latency` seconds. Measured in the same run, in this order:

- bare:   `AsyncOpenAI.chat.completions.create` under an `asyncio.Semaphore` (the floor any
          client built on the SDK pays);
- engine: `run_jobs(OpenAITeacher)` with the direct aiohttp client (`teacher.http_client:
          direct`, the default): retries, rate/budget bookkeeping, replica pool, progress
          accounting, no cache; again with a fresh sqlite cache (every completion written); again
          with the bare httpx client (`http_client: httpx`) and with the SDK (`http_client: sdk`);
- curator: bespokelabs-curator's OpenAI backend, when `--curator-python` names a venv that
          has it (`python -m venv /tmp/curator-venv && /tmp/curator-venv/bin/pip install
          bespokelabs-curator`), with a throwaway cache and its rate limits out of the way.

Reported: requests/s over the client's wall time, the steady-state rate the server saw (chat
requests over first-to-last arrival: start-up excluded, which is fair to a client with a slow
start), ratios to bare and to the ideal `concurrency / latency`, and client CPU ms per request
(this process only; the server's CPU is not counted). The machine is usually shared: run with
`--repeat 5` and report the per-round ratios (each round runs every client once, order
alternating between rounds); `--clients direct,curator` times just those two.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
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


def engine(url: str, n: int, concurrency: int, cache_dir: Path | None,
           http_client: str = "direct") -> None:
    from distill.config import TeacherConfig
    from distill.teachers.base import Job, SamplingParams
    from distill.teachers.cache import ResponseCache
    from distill.teachers.engine import run_jobs
    from distill.teachers.openai_backend import OpenAITeacher

    cfg = TeacherConfig(backend="openai", model="fake-model", base_url=url, api_key_env=None,
                        max_concurrency=concurrency, http_client=http_client)
    params = SamplingParams(max_tokens=16, temperature=0.7)
    jobs = [Job(key=f"q{i}", messages=[{"role": "user", "content": f"q{i}"}], params=params,
                samples=[0]) for i in range(n)]
    if cache_dir is None:
        results, stats = run_jobs(OpenAITeacher(cfg), jobs, None, show_progress=False)
    else:
        with ResponseCache(cache_dir / f"cache-{time.time_ns()}.sqlite") as cache:
            results, stats = run_jobs(OpenAITeacher(cfg), jobs, cache, show_progress=False)
            assert len(cache) == n or stats.failed
    if stats.failed or len(results) != n:
        raise RuntimeError(f"engine run failed: {stats}")


CURATOR_SCRIPT = """
import sys, tempfile, os
url, n, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.environ["CURATOR_CACHE_DIR"] = tempfile.mkdtemp()
import tiktoken  # offline: curator's token estimate gets a ~4 chars/token stand-in, not the BPE


class _Chars:
    def encode(self, text, *args, **kwargs):
        return [0] * (len(text) // 4 + 1)


tiktoken.get_encoding = tiktoken.encoding_for_model = lambda name: _Chars()
from bespokelabs import curator
llm = curator.LLM(model_name="fake-model", backend="openai",
                  generation_params={"max_tokens": 16, "temperature": 0.7},
                  backend_params={"base_url": url, "api_key": "bench",
                                  "max_concurrent_requests": c,
                                  "max_requests_per_minute": 10_000_000,
                                  "max_tokens_per_minute": 10_000_000_000,
                                  "require_all_responses": True, "max_retries": 0})
out = llm([f"q{i}" for i in range(n)])
assert len(out.dataset if hasattr(out, "dataset") else out) == n
"""


def curator(python: str, url: str, n: int, concurrency: int) -> None:
    """bespokelabs-curator in its own venv (`--curator-python`), against the same server."""
    env = os.environ | {"TELEMETRY_ENABLED": "false", "CURATOR_VIEWER": "0",
                        "LITELLM_LOCAL_MODEL_COST_MAP": "True", "CURATOR_DISABLE_RICH_DISPLAY": "1"}
    subprocess.run([python, "-c", CURATOR_SCRIPT, url, str(n), str(concurrency)], env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def server_window(url: str, reset: bool) -> dict[str, float]:
    """The server's count and first/last arrival of chat requests (POST: and start over)."""
    root = url.rsplit("/v1", 1)[0]
    req = urllib.request.Request(f"{root}/stats", method="POST" if reset else "GET")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def measure(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall s, CPU s of this process and of children it waited for: curator's subprocess)."""
    def cpu() -> float:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + kids.ru_utime + kids.ru_stime

    wall0, cpu0 = time.perf_counter(), cpu()
    fn()
    return time.perf_counter() - wall0, cpu() - cpu0


CLIENTS = ("bare", "direct", "cache", "httpx", "sdk", "curator")
NAMES = {"bare": "bare AsyncOpenAI + semaphore", "direct": "engine (direct: aiohttp)",
         "cache": "engine (direct) + sqlite cache", "httpx": "engine (httpx client)",
         "sdk": "engine (sdk client)", "curator": "bespokelabs-curator"}


def main() -> None:
    parser = argparse.ArgumentParser(description="OpenAI teacher engine throughput")
    parser.add_argument("-n", "--requests", type=int, default=3000)
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.05, help="server latency, seconds")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds; each runs every client once, in alternating order")
    parser.add_argument("--clients", default=",".join(CLIENTS),
                        help=f"comma-separated subset of {', '.join(CLIENTS)}")
    parser.add_argument("--curator-python", default="/tmp/curator-venv/bin/python",
                        help="python of a venv with bespokelabs-curator (skipped if missing)")
    args = parser.parse_args()
    n, c = args.requests, args.concurrency
    chosen = [k for k in args.clients.split(",") if k]
    unknown = set(chosen) - set(CLIENTS)
    if unknown:
        parser.error(f"--clients: unknown {sorted(unknown)}; expected some of {CLIENTS}")
    if "curator" in chosen and not Path(args.curator_python).exists():
        chosen.remove("curator")

    proc, url = start_server(args.latency)
    try:
        # Warm up imports, platform detection and the server before timing anything.
        bare_client(url, min(n, 2 * c), c)
        engine(url, min(n, 2 * c), c, None)
        engine(url, min(n, 2 * c), c, None, "httpx")
        with tempfile.TemporaryDirectory() as tmp:
            runs: dict[str, Callable[[], None]] = {
                "bare": lambda: bare_client(url, n, c),
                "direct": lambda: engine(url, n, c, None),
                "cache": lambda: engine(url, n, c, Path(tmp)),
                "httpx": lambda: engine(url, n, c, None, "httpx"),
                "sdk": lambda: engine(url, n, c, None, "sdk"),
                "curator": lambda: curator(args.curator_python, url, n, c),
            }
            done: dict[str, list[tuple[float, float, float]]] = {k: [] for k in chosen}
            for r in range(args.repeat):
                # Alternate the order: on a shared machine, load drifts within a round.
                for key in (chosen if r % 2 == 0 else chosen[::-1]):
                    server_window(url, reset=True)
                    wall, cpu = measure(runs[key])
                    w = server_window(url, reset=True)
                    steady = (w["chat"] - 1) / max(w["last"] - w["first"], 1e-9)
                    done[key].append((wall, cpu, steady))
    finally:
        proc.terminate()
        proc.wait(10)

    ideal = c / args.latency
    print(f"\n{n} requests, concurrency {c}, server latency {args.latency * 1000:.0f} ms, "
          f"ideal {ideal:.0f} req/s, {os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
          f"{args.repeat} round(s)")
    print("steady = the server's view: requests / (last arrival - first arrival), which leaves "
          "out client start-up (curator's dataset and cache set-up); CPU: the client's, the "
          "server's not counted (*: curator's subprocess, start-up included). Median of the "
          "rounds, [min-max] of steady\n")
    header = f"{'client':32} {'wall s':>7} {'req/s':>7} {'steady':>7} {'range':>11} " \
             f"{'vs ideal':>9} {'CPU ms/req':>11}"
    print(header)
    print("-" * len(header))
    for key, rows in done.items():
        wall, cpu, steady = (statistics.median(x[i] for x in rows) for i in range(3))
        lo, hi = min(x[2] for x in rows), max(x[2] for x in rows)
        cpu_text = f"{cpu * 1000 / n:11.3f}" + ("*" if key == "curator" else "")
        span = f"{lo:.0f}-{hi:.0f}"
        print(f"{NAMES[key]:32} {wall:7.2f} {n / wall:7.0f} {steady:7.0f} {span:>11}"
              f" {steady / ideal:9.2f} {cpu_text}")
    if "direct" in done:
        for other in ("curator", "httpx", "sdk", "bare"):
            if other in done:
                ratios = [a[2] / b[2] for a, b in zip(done["direct"], done[other], strict=True)]
                print(f"\nengine (direct) / {NAMES[other]}, steady req/s per round: "
                      + ", ".join(f"{x:.2f}x" for x in ratios)
                      + f"  (median {statistics.median(ratios):.2f}x, "
                        f"range {min(ratios):.2f}-{max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
