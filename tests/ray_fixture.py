"""A local Ray cluster for the `test_ray_*` files (not a conftest: import what you use).

    from ray_fixture import ray_cluster   # a test that takes it skips when `ray` is missing

`ray_cluster` starts Ray in this process with 2 CPUs, once per module, and shuts it down after;
the stages then find it connected (`executor.connect` keeps an existing connection).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distill.config import PipelineConfig


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """Skips the test when the `ray` extra is not installed."""
    ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install -e "
                                            "'.[ray]')")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()


def sum_config(root: Path, url: str, *, executor: dict[str, Any] | None = None,
               samples: int = 1, adaptive: dict[str, Any] | None = None,
               **teacher: Any) -> PipelineConfig:
    """A cot pipeline over `write_sum_project(root, n)` against the loopback teacher at `url`."""
    gen: dict[str, Any] = {"prompt": "p.j2", "max_tokens": 16, "samples_per_prompt": samples}
    if adaptive is not None:
        gen["adaptive"] = adaptive
    return PipelineConfig.model_validate({
        "name": "ray", "root": str(root), "seeds": {"path": "seeds.jsonl"},
        "teacher": {"backend": "openai", "model": "fake-model", "base_url": url,
                    "api_key_env": None, "max_concurrency": 2, "timeout_s": 30.0,
                    "price_in_per_mtok": 1.0, "price_out_per_mtok": 2.0} | teacher,
        "generate": gen, "executor": executor or {"kind": "local"},
    })


def without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the one field that differs between two runs of a deterministic teacher."""
    return [{k: v for k, v in r.items() if k != "latency_s"} for r in rows]


def cached_count(path: Path) -> int:
    """Entries in a response cache (read-only; 0 while the file does not exist yet)."""
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])
    except sqlite3.OperationalError:  # created, table not yet
        return 0


def attempts(shard: Path) -> list[dict[str, Any]]:
    path = shard / "attempts.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (a driver started with start_new_session=True and the Ray
    processes it started)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(p) for p, s in (line.split() for line in out.splitlines() if line.strip())
            if int(s) == sid]


def kill_session(sid: int) -> None:
    """SIGKILL what is left of a session we started (by pid, never by name)."""
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
