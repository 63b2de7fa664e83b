"""The in-process limiter: GCRA state in dicts, for one worker.

Each worker process has its own counters: with several workers or replicas a key
may get that many times its limit (use the Redis limiter to share them). Every
method runs without awaiting, so a check and its update are atomic on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from proxy.ratelimit.algorithm import PERIOD, Decision, Quota, Window, gcra, settle

_SWEEP_EVERY = 60.0  # seconds between drops of buckets that are full again


class MemoryLimiter:
    scope = "process"

    def __init__(self, clock: Callable[[], float] = time.monotonic, period: float = PERIOD) -> None:
        self._clock = clock
        self._period = period
        self._requests: dict[str, float] = {}  # key -> TAT
        self._tokens: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}
        self._next_sweep = clock() + _SWEEP_EVERY

    async def acquire(self, key: str, quota: Quota, cost: int) -> Decision:
        return self.acquire_now(key, quota, cost)

    def acquire_now(self, key: str, quota: Quota, cost: int) -> Decision:
        """`acquire` without a coroutine: nothing here waits."""
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        exceeded: list[str] = []
        retry = 0.0
        in_flight = self._in_flight.get(key, 0)
        if quota.max_concurrent and in_flight >= quota.max_concurrent:
            exceeded.append("concurrent")
            retry = 1.0
        req = tok = None
        if quota.requests_per_minute:
            req = gcra(
                self._requests.get(key, 0.0), now, quota.requests_per_minute, 1, self._period
            )
            if not req.allowed:
                exceeded.append("requests")
                retry = max(retry, req.retry_after)
        if quota.tokens_per_minute:
            tok = gcra(self._tokens.get(key, 0.0), now, quota.tokens_per_minute, cost, self._period)
            if not tok.allowed:
                exceeded.append("tokens")
                retry = max(retry, tok.retry_after)
        allowed = not exceeded
        lease = None
        if allowed:
            if req is not None:
                self._requests[key] = req.tat
            if tok is not None:
                self._tokens[key] = tok.tat
            if quota.max_concurrent:
                in_flight += 1
                self._in_flight[key] = in_flight
                lease = "held"
        return Decision(
            allowed=allowed,
            requests=Window(quota.requests_per_minute, req.remaining, req.reset)
            if req and quota.requests_per_minute
            else None,
            tokens=Window(quota.tokens_per_minute, tok.remaining, tok.reset)
            if tok and quota.tokens_per_minute
            else None,
            exceeded=tuple(exceeded),
            retry_after=retry,
            lease=lease,
            in_flight=in_flight,
        )

    async def settle(self, key: str, quota: Quota, lease: str | None, token_delta: int) -> None:
        self.settle_now(key, quota, lease, token_delta)

    def settle_now(self, key: str, quota: Quota, lease: str | None, token_delta: int) -> None:
        """`settle` without a coroutine: nothing here waits."""
        if lease is not None:
            left = self._in_flight.get(key, 0) - 1
            if left > 0:
                self._in_flight[key] = left
            else:
                self._in_flight.pop(key, None)
        if token_delta and quota.tokens_per_minute:
            now = self._clock()
            self._tokens[key] = settle(
                self._tokens.get(key, 0.0), now, quota.tokens_per_minute, token_delta, self._period
            )

    async def close(self) -> None:
        self._requests.clear()
        self._tokens.clear()
        self._in_flight.clear()

    def _sweep(self, now: float) -> None:
        """Forget buckets that are full again: their state equals a fresh one's."""
        for table in (self._requests, self._tokens):
            for key in [k for k, tat in table.items() if tat <= now]:
                del table[key]
        self._next_sweep = now + _SWEEP_EVERY
