"""Rate limiting: GCRA per key for requests and tokens, and a concurrency count.

Two limiters share one protocol: `MemoryLimiter` (counters in this process) and
`RedisLimiter` (counters in Redis, one atomic Lua script per check, shared by every
worker and replica).
"""

from __future__ import annotations

from typing import Protocol

from proxy.ratelimit.algorithm import Decision, Quota, Window, format_reset


class StoreError(Exception):
    """The limiter's store could not be reached or did not answer in time."""


class Limiter(Protocol):
    """Where the counters of the rate_limit middleware live."""

    #: "process" (each worker counts on its own) or "shared" (every worker and replica)
    scope: str

    async def acquire(self, key: str, quota: Quota, cost: int) -> Decision:
        """Check every limit of `quota` for `key` at once; when all pass, count one
        request, reserve `cost` tokens and take a concurrency slot (`Decision.lease`).
        Nothing is counted for a refused request. Raises StoreError."""
        ...

    async def settle(self, key: str, quota: Quota, lease: str | None, token_delta: int) -> None:
        """The end of an admitted request: give back its concurrency slot and charge
        `token_delta` more tokens (negative: refund). Raises StoreError."""
        ...

    async def close(self) -> None: ...


__all__ = ["Decision", "Limiter", "Quota", "StoreError", "Window", "format_reset"]
