"""The in-process limiter: GCRA state in dicts, for one worker.

Each worker process has its own counters: with several workers or replicas a key
may get that many times its limit (use the Redis limiter to share them). Every
method runs without awaiting, so a check and its update are atomic on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from proxy.ratelimit.algorithm import PERIOD, Decision, Quota, Window, gcra_fields, settle

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
        exceeded: tuple[str, ...] = ()
        retry = 0.0
        in_flight = self._in_flight.get(key, 0)
        max_concurrent = quota.max_concurrent
        if max_concurrent and in_flight >= max_concurrent:
            exceeded = ("concurrent",)
            retry = 1.0
        rpm = quota.requests_per_minute
        tpm = quota.tokens_per_minute
        req = tok = None
        requests = tokens = None
        if rpm:
            req = gcra_fields(self._requests.get(key, 0.0), now, rpm, 1, self._period)
            requests = Window(rpm, req[2], req[3])
            if not req[0]:
                exceeded += ("requests",)
                retry = max(retry, req[4])
        if tpm:
            tok = gcra_fields(self._tokens.get(key, 0.0), now, tpm, cost, self._period)
            tokens = Window(tpm, tok[2], tok[3])
            if not tok[0]:
                exceeded += ("tokens",)
                retry = max(retry, tok[4])
        lease = None
        if not exceeded:
            if req is not None:
                self._requests[key] = req[1]
            if tok is not None:
                self._tokens[key] = tok[1]
            if max_concurrent:
                in_flight += 1
                self._in_flight[key] = in_flight
                lease = "held"
        return Decision(
            not exceeded,
            requests,
            tokens,
            exceeded,
            retry,
            lease,
            in_flight,
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
