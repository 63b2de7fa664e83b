"""The one Redis connection pool of a proxy process whose store is Redis: opened once
by the application and shared by the session store and the rate-limit counters (each
builds its client on it; neither closes it)."""

from __future__ import annotations

from redis.asyncio import ConnectionPool

from proxy.config import StoreConfig


def open_pool(cfg: StoreConfig) -> ConnectionPool:
    """A pool for `store.url`; nothing connects until a first command. Replies are
    decoded (the session store reads text; the limiter's scripts answer integers)."""
    pool: ConnectionPool = ConnectionPool.from_url(
        cfg.url, decode_responses=True, socket_connect_timeout=5, socket_timeout=10
    )
    return pool
