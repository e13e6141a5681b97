"""Several endpoints serving one model: pick the least busy, skip the broken, probe before reuse.

A replica that fails `max_failures` times in a row (connection errors, timeouts, 5xx) sits out a
cooldown that doubles on each relapse; when it is due again, one worker probes `GET /models`
before real traffic returns to it. Requests that fail on one replica are retried on another.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from distill.teachers.limits import Clock


@dataclass
class Replica:
    url: str
    client: Any = None
    index: int = 0
    in_flight: int = 0
    sent: int = 0
    failures: int = 0
    """Consecutive failures."""
    unhealthy_until: float = 0.0
    cooldown_s: float = 0.0
    needs_probe: bool = False
    probing: bool = False
    last_error: str | None = None
    _order: int = field(default=0, repr=False)


class ReplicaPool:
    def __init__(self, replicas: list[Replica], *, max_failures: int = 3,
                 cooldown_s: float = 5.0, max_cooldown_s: float = 120.0,
                 probe: Callable[[Replica], Awaitable[bool]] | None = None,
                 max_wait_s: float = 30.0, clock: Clock = time.monotonic) -> None:
        if not replicas:
            raise ValueError("no replicas")
        self.replicas = replicas
        for i, r in enumerate(replicas):
            r.index = i
        self.max_failures = max(1, max_failures)
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self._probe = probe
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._rr = itertools.count()

    def __len__(self) -> int:
        return len(self.replicas)

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    def healthy(self) -> list[Replica]:
        now = self._clock()
        return [r for r in self.replicas if r.unhealthy_until <= now and not r.probing]

    async def acquire(self, avoid: Replica | None = None) -> Replica:
        """The least-loaded usable replica (round-robin among ties), preferring not `avoid`.

        When every replica is cooling down, wait for the first to come due, but at most
        `max_wait_s`: then the soonest-due one gets the request unprobed, so a pool that is all
        down fails requests (which callers count and bound) instead of stalling forever.
        A replica coming back from a cooldown is probed first; a failed probe benches it again.
        """
        deadline = self._clock() + self.max_wait_s
        while True:
            if len(self.replicas) == 1:
                # Nothing to fail over to: backoff in the caller paces the retries.
                r = self.replicas[0]
                r.in_flight += 1
                return r
            candidates = self.healthy()
            if avoid is not None and len(candidates) > 1:
                candidates = [r for r in candidates if r is not avoid] or candidates
            if not candidates:
                now = self._clock()
                waiting = [r for r in self.replicas if not r.probing] or self.replicas
                soonest = min(waiting, key=lambda r: r.unhealthy_until)
                if now >= deadline:
                    soonest.in_flight += 1
                    return soonest
                await asyncio.sleep(max(0.01, min(soonest.unhealthy_until, deadline) - now))
                continue
            turn = next(self._rr)
            for r in candidates:
                r._order = (r.index - turn) % len(self.replicas)
            best = min(candidates, key=lambda r: (r.in_flight, r._order))
            if best.needs_probe and not await self._probe_replica(best):
                continue
            best.in_flight += 1
            return best

    def release(self, replica: Replica) -> None:
        replica.in_flight = max(0, replica.in_flight - 1)
        replica.sent += 1

    def success(self, replica: Replica) -> None:
        replica.failures = 0
        replica.cooldown_s = 0.0
        replica.last_error = None

    def failure(self, replica: Replica, why: str) -> None:
        replica.failures += 1
        replica.last_error = why
        if len(self.replicas) > 1 and replica.failures >= self.max_failures:
            self._bench(replica)

    def _bench(self, replica: Replica) -> None:
        replica.cooldown_s = min(self.max_cooldown_s,
                                 max(self.base_cooldown_s, replica.cooldown_s * 2))
        replica.unhealthy_until = self._clock() + replica.cooldown_s
        replica.needs_probe = True
        replica.failures = 0

    async def _probe_replica(self, replica: Replica) -> bool:
        if self._probe is None:
            replica.needs_probe = False
            return True
        replica.probing = True
        try:
            ok = await self._probe(replica)
        except Exception:  # noqa: BLE001 - any probe failure means "not yet"
            ok = False
        finally:
            replica.probing = False
        if ok:
            # Keep cooldown_s: a replica that relapses before a real success sits out longer.
            replica.needs_probe = False
        else:
            self._bench(replica)
        return ok

    def summary(self) -> list[dict[str, Any]]:
        return [{"url": r.url, "sent": r.sent, "healthy": r.unhealthy_until <= self._clock(),
                 "last_error": r.last_error} for r in self.replicas]
