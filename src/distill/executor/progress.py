"""The driver's view of shard tasks: one progress bar and one set of stats for the manifest.

Each shard task wraps its teacher in `Reporting`, which pushes its running counts (sent, failed,
tokens, dollars) to a `_Tally` actor at most twice a second; the driver reads the actor's
snapshot between `ray.wait` calls and draws the same bar as a local run (`engine.make_progress`).
A retried attempt reports from zero again: the bar then shows what this attempt sent.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from distill.teachers.base import BatchItem, Completion, Job, completion_cost, stream_batch

REPORT_EVERY_S = 0.5
COUNTS = ("sent", "failed", "prompt_tokens", "completion_tokens", "cost_usd")


class _Tally:
    """Ray actor: the latest counts of every shard attempt."""

    def __init__(self) -> None:
        self.live: dict[int, dict[str, float]] = {}

    def report(self, shard: int, counts: dict[str, float]) -> None:
        self.live[shard] = counts

    def snapshot(self) -> dict[int, dict[str, float]]:
        return self.live


class Reporting:
    """A teacher whose completions are also counted for the driver's bar (everything else is
    the wrapped teacher's: backend, model id, cache keys)."""

    def __init__(self, inner: Any, board: Any, shard: int, price_in: float,
                 price_out: float) -> None:
        self._inner, self._board, self._shard = inner, board, shard
        self._prices = (price_in, price_out)
        self.counts: dict[str, float] = dict.fromkeys(COUNTS, 0)
        self._pushed = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def stream(self, jobs: Sequence[Job]) -> AsyncIterator[tuple[Job, int, Completion]]:
        async for job, s, comp in self._inner.stream(jobs):
            c = self.counts
            c["sent"] += 1
            c["failed"] += bool(comp.error)
            c["prompt_tokens"] += comp.prompt_tokens
            c["completion_tokens"] += comp.completion_tokens
            c["cost_usd"] += completion_cost(comp, *self._prices)
            if time.monotonic() - self._pushed >= REPORT_EVERY_S:
                self.push()
            yield job, s, comp
        self.push()

    def push(self) -> None:
        self._pushed = time.monotonic()
        if self._board is not None:
            with contextlib.suppress(Exception):  # the bar is best effort, the rows are not
                self._board.report.remote(self._shard, dict(self.counts))

    def generate_batch(self, batch: Sequence[BatchItem]) -> list[Completion]:
        return stream_batch(self, batch)

    async def aclose(self) -> None:
        self.push()
        await self._inner.aclose()


def reporting_factory(board: Any, shard: int, price_in: float, price_out: float
                      ) -> Callable[[Any], Reporting]:
    return lambda teacher: Reporting(teacher, board, shard, price_in, price_out)


class ProgressBoard:
    """The driver's bar over all shards: finished shards count whole, running ones by what
    their tasks reported."""

    def __init__(self, ray: Any, description: str, total: int | None, done_before: int,
                 show: bool = True) -> None:
        from distill.teachers.engine import make_progress

        self.ray = ray
        self.actor = ray.remote(num_cpus=0)(_Tally).remote()
        self.progress = make_progress()
        self.task = self.progress.add_task(description, total=total, completed=done_before,
                                           info="")
        self.before = done_before
        self.done: dict[int, dict[str, Any]] = {}
        self.show = show
        self._drawn = 0.0

    def __enter__(self) -> ProgressBoard:
        if self.show:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.refresh(force=True)
        if self.show:
            self.progress.stop()
        with contextlib.suppress(Exception):
            self.ray.kill(self.actor)

    def finished(self, shard: int, stats: dict[str, Any]) -> None:
        self.done[shard] = stats

    def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._drawn < REPORT_EVERY_S:
            return
        self._drawn = time.monotonic()
        live = self.ray.get(self.actor.snapshot.remote(), timeout=30)
        running = [c for shard, c in live.items() if shard not in self.done]
        sums = {k: sum(float(s.get(k, 0)) for s in [*self.done.values(), *running])
                for k in COUNTS}
        completed = self.before + sum(s.get("requested", 0) for s in self.done.values()) + sum(
            c.get("sent", 0) for c in running)
        info = (f"shards {len(self.done)} done · sent {int(sums['sent'])} · failed "
                f"{int(sums['failed'])} · tok {int(sums['prompt_tokens'])}"
                f"+{int(sums['completion_tokens'])} · ${sums['cost_usd']:.4f}")
        self.progress.update(self.task, completed=completed, info=info)


# -------------------------------------------------------------------------------- stats

_SAME = {"k", "max_samples", "rounds"}
_MAX = {"rounds_run"}


def merge_stats(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The shards' stats as one run's: counts add up, histograms add per bucket, adaptive
    rounds add per round, ratios are recomputed."""
    out: dict[str, Any] = {}
    for part in parts:
        out = _merge(out, part)
    out.pop("attempts", None)
    a = out.get("adaptive")
    if isinstance(a, dict):
        kept = a.get("kept_rows") or 0
        a["samples_per_kept_row"] = round(a.get("samples", 0) / kept, 3) if kept else None
        a["cost_per_kept_row_usd"] = round(out.get("cost_usd", 0.0) / kept, 6) if kept else None
        for key, value in a.items():
            if key.endswith("histogram") and isinstance(value, dict):
                a[key] = dict(sorted(value.items(), key=lambda kv: int(kv[0])))
    if "cost_usd" in out:
        out["cost_usd"] = round(out["cost_usd"], 6)
    return out


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = _copy(value)
        elif key in _SAME:
            continue
        elif key in _MAX:
            out[key] = max(out[key], value)
        elif isinstance(value, bool):
            out[key] = bool(out[key]) or value
        elif isinstance(value, int | float):
            out[key] = out[key] + value
        elif isinstance(value, dict):
            out[key] = _merge(out[key], value)
        elif key == "per_round":
            out[key] = _merge_rounds(out[key], value)
        elif isinstance(value, list):
            out[key] = out[key] + value
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _merge_rounds(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_round = {r["round"]: dict(r) for r in a}
    for r in b:
        if r["round"] in by_round:
            merged = by_round[r["round"]]
            for k in ("seeds", "samples", "verified"):
                merged[k] = merged.get(k, 0) + r.get(k, 0)
            merged["cost_usd"] = round(merged.get("cost_usd", 0.0) + r.get("cost_usd", 0.0), 6)
        else:
            by_round[r["round"]] = dict(r)
    return [by_round[k] for k in sorted(by_round)]
