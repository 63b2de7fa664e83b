"""The process's shared Redis connections (proxy/shared_redis.py) on each shape: one
server (127.0.0.1:6379), Sentinel and a cluster (deployments of their own)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from proxy.config import StoreConfig
from proxy.ratelimit import Quota
from proxy.ratelimit.redis import open_limiter
from proxy.sessions.store import open_store
from proxy.shared_redis import close_pool, open_pool
from tests.ratelimit.fixtures import REDIS_URL, drop_keys, require_redis


@pytest.fixture(params=["redis", "redis-sentinel", "redis-cluster"])
def section(request: pytest.FixtureRequest) -> dict[str, Any]:
    prefix = f"pool-{uuid.uuid4().hex[:8]}:"
    if request.param == "redis":
        require_redis()
        request.addfinalizer(lambda: asyncio.run(drop_keys(prefix)))
        return {"backend": "redis", "url": REDIS_URL, "prefix": prefix}
    deployment = request.getfixturevalue(request.param.replace("-", "_"))
    value: dict[str, Any] = deployment.store_config(prefix)
    return value


async def test_more_commands_at_once_than_redis_pys_default_pool_holds(
    section: dict[str, Any],
) -> None:
    """redis-py's pools hold 100 connections unless told otherwise; one process serves
    more requests than that at a time, each holding a connection for a command."""
    cfg = StoreConfig(**section)
    shared = open_pool(cfg)
    limiter = open_limiter(cfg, shared)
    store = await open_store(cfg, shared)
    try:
        quota = Quota(requests_per_minute=100_000)
        # the scripts loaded first (each first call would be three round trips)
        assert (await limiter.acquire("k", quota, 0)).allowed
        started = time.monotonic()
        results = await asyncio.gather(
            *[limiter.acquire(f"k{i % 7}", quota, 0) for i in range(150)],
            *[store.get_session("owner", f"s{i}") for i in range(50)],
        )
        elapsed = time.monotonic() - started
        assert all(d.allowed for d in results[:150])
        assert results[150:] == [None] * 50
        shape = "a cluster" if cfg.cluster else "Sentinel" if cfg.sentinel else "one server"
        print(f"\n200 commands at once on {shape}: {elapsed * 1000:.0f} ms")
    finally:
        await limiter.close()
        await store.close()
        await close_pool(shared)
