"""Rate limiting: GCRA per key for requests and tokens, and a concurrency count.

This package holds the whole feature. Here: the protocol of a limiter and the types
it speaks in. `algorithm` is the GCRA arithmetic; two limiters share the protocol:
`local.MemoryLimiter` (counters in this process) and `redis.RedisLimiter` (counters
in Redis, one atomic Lua script per check, shared by every worker and replica). The
rate_limit middleware is `middleware`, with its `options`, the token `estimate` of
a request at admission and the `meter` that settles it when the response ends.
"""

from __future__ import annotations

from typing import Protocol

from proxy.ratelimit.algorithm import Decision, Quota, Window, format_reset

# the request's key (aiohttp's per-request mapping) under which the Redis limiter
# leaves the session lookup it sent with its check: (owner, digest, session id or None)
LOOKED_UP = "chat_proxy.session_looked_up"


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


__all__ = ["LOOKED_UP", "Decision", "Limiter", "Quota", "StoreError", "Window", "format_reset"]
