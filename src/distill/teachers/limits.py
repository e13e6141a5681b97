"""Rate limits, a shared pause, retry delays and the spend budget for API teachers.

All of it is plain asyncio on one event loop: no threads, no locks beyond `asyncio.Lock`.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections import deque
from collections.abc import Callable, Mapping

from distill.teachers.base import cost_usd

Clock = Callable[[], float]


class TokenBucket:
    """`rate_per_s` units refill continuously up to `capacity`; `acquire(x)` waits for them.

    A request larger than the bucket (a 30k-token prompt under a small per-second share of the
    tokens-per-minute limit) waits for a full bucket and then drives the level negative, so the
    debt is paid back before anyone else proceeds: large requests are slow, never stuck.
    Waiters are served first come, first served.
    """

    def __init__(self, rate_per_s: float, capacity: float, *, clock: Clock = time.monotonic):
        if rate_per_s <= 0 or capacity <= 0:
            raise ValueError("rate_per_s and capacity must be positive")
        self.rate = rate_per_s
        self.capacity = capacity
        self._clock = clock
        self._level = capacity
        self._stamp = clock()
        self._lock = asyncio.Lock()

    @classmethod
    def per_minute(cls, limit: float, *, burst_s: float = 1.0,
                   clock: Clock = time.monotonic) -> TokenBucket:
        """A bucket for a per-minute limit that allows about `burst_s` seconds' worth at once."""
        rate = limit / 60.0
        return cls(rate, max(1.0, rate * burst_s), clock=clock)

    @property
    def level(self) -> float:
        self._refill()
        return self._level

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self, amount: float = 1.0) -> None:
        async with self._lock:
            need = min(amount, self.capacity)
            while True:
                self._refill()
                if self._level >= need:
                    self._level -= amount
                    return
                await asyncio.sleep((need - self._level) / self.rate)

    def refund(self, amount: float) -> None:
        """Give back units taken on an estimate that turned out too high."""
        self._refill()
        self._level = min(self.capacity, self._level + amount)


class PauseGate:
    """A pause every worker honours: a 429 storm stops the whole pool, not one worker."""

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._resume_at = 0.0

    def pause_for(self, seconds: float) -> None:
        self._resume_at = max(self._resume_at, self._clock() + max(0.0, seconds))

    @property
    def remaining(self) -> float:
        return max(0.0, self._resume_at - self._clock())

    async def wait(self) -> None:
        while (left := self.remaining) > 0:
            await asyncio.sleep(left)


class StormDetector:
    """Counts 429s in a sliding window; `hit()` says whether this one makes a storm."""

    def __init__(self, threshold: int = 3, window_s: float = 2.0, *,
                 clock: Clock = time.monotonic) -> None:
        self.threshold = max(1, threshold)
        self.window_s = window_s
        self._clock = clock
        self._hits: deque[float] = deque()
        self.storms = 0

    def hit(self) -> bool:
        now = self._clock()
        self._hits.append(now)
        while self._hits and now - self._hits[0] > self.window_s:
            self._hits.popleft()
        if len(self._hits) >= self.threshold:
            self._hits.clear()
            self.storms += 1
            return True
        return False


def backoff_delay(attempt: int, *, base: float = 1.0, cap: float = 60.0,
                  rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: uniform in [d/2, d], d = min(cap, base * 2**attempt)."""
    d = min(cap, base * (2.0 ** max(0, attempt)))
    r = (rng or random).random()
    return d / 2 + r * d / 2


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from `retry-after-ms`, `retry-after` (seconds or an HTTP date), if any."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class BudgetExhausted(Exception):
    """No new request fits under `max_cost_usd`."""


class Budget:
    """Spend accounting that never issues a request that could cross `max_usd`.

    Each request reserves its worst case (estimated prompt + max_tokens for every sample) before
    it is sent and settles the actual usage after. When a request does not fit it waits for the
    requests in flight to settle (their reservations are usually generous); only when nothing is
    in flight and it still does not fit does the budget close for good.
    """

    def __init__(self, max_usd: float | None, price_in: float, price_out: float) -> None:
        self.max_usd = max_usd
        self.price_in = price_in
        self.price_out = price_out
        self.spent = 0.0
        self.reserved = 0.0
        self.closed = False
        self._cond: asyncio.Condition | None = None

    @property
    def enabled(self) -> bool:
        return self.max_usd is not None

    def rebind(self) -> None:
        """Forget the condition of an earlier event loop (each run may use a new one)."""
        self._cond = None

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return cost_usd(prompt_tokens, completion_tokens, self.price_in, self.price_out)

    async def reserve(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Reserve the worst-case cost; raise `BudgetExhausted` when it can never fit."""
        if not self.enabled:
            return 0.0
        assert self.max_usd is not None
        amount = self.cost(prompt_tokens, completion_tokens)
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            while True:
                if self.closed:
                    raise BudgetExhausted
                if self.spent + self.reserved + amount <= self.max_usd + 1e-12:
                    self.reserved += amount
                    return amount
                if self.reserved <= 1e-12:
                    self.closed = True
                    self._cond.notify_all()
                    raise BudgetExhausted
                await self._cond.wait()

    def try_reserve(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """Reserve the worst-case cost if it fits now, else None (never waits: a Batch API run
        cannot wait on reservations that settle hours later in the same coroutine)."""
        if not self.enabled:
            return 0.0
        assert self.max_usd is not None
        amount = self.cost(prompt_tokens, completion_tokens)
        if self.closed or self.spent + self.reserved + amount > self.max_usd + 1e-12:
            return None
        self.reserved += amount
        return amount

    async def settle(self, reserved: float, prompt_tokens: int, completion_tokens: int) -> None:
        """Replace a reservation by what the request actually cost."""
        self.spent += self.cost(prompt_tokens, completion_tokens)
        if not self.enabled:
            return
        self.reserved = max(0.0, self.reserved - reserved)
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            self._cond.notify_all()

    def message(self) -> str:
        return (f"budget: max_cost_usd {self.max_usd:g} reached "
                f"(spent ${self.spent:.4f}); not sent")
