"""The Redis limiter on its own: counts shared between clients, its scripts after a
flush, leases of running requests, and keys that expire (the server at 127.0.0.1:6379)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from proxy.ratelimit import Quota
from proxy.ratelimit.redis import RedisLimiter, connect
from tests.ratelimit.fixtures import REDIS_URL, drop_keys, require_redis


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    require_redis()
    prefix = f"test-rl-{uuid.uuid4().hex[:8]}:"
    yield prefix
    await drop_keys(prefix)


async def test_redis_limiters_share_one_count(redis_prefix: str) -> None:
    a = RedisLimiter(connect(REDIS_URL), redis_prefix)
    b = RedisLimiter(connect(REDIS_URL), redis_prefix)
    quota = Quota(requests_per_minute=10)
    try:
        results = await asyncio.gather(
            *[(a if i % 2 else b).acquire("k", quota, 0) for i in range(40)]
        )
        assert sum(d.allowed for d in results) == 10
    finally:
        await a.close()
        await b.close()


async def test_redis_script_reloaded_after_script_flush(redis_prefix: str) -> None:
    lim = RedisLimiter(connect(REDIS_URL), redis_prefix)
    try:
        assert (await lim.acquire("k", Quota(requests_per_minute=2), 0)).allowed
        await lim.client.script_flush()  # as after a Redis restart: EVALSHA says NOSCRIPT
        assert (await lim.acquire("k", Quota(requests_per_minute=2), 0)).allowed
        assert not (await lim.acquire("k", Quota(requests_per_minute=2), 0)).allowed
    finally:
        await lim.close()


async def test_redis_slots_of_a_dead_replica_expire_and_live_ones_are_renewed(
    redis_prefix: str,
) -> None:
    quota = Quota(max_concurrent=1)
    dead = RedisLimiter(connect(REDIS_URL), redis_prefix, lease=0.3)
    alive = RedisLimiter(connect(REDIS_URL), redis_prefix, lease=0.3)
    other = RedisLimiter(connect(REDIS_URL), redis_prefix, lease=0.3)
    try:
        assert (await dead.acquire("gone", quota, 0)).allowed
        await dead.close()  # stops renewing without giving the slot back
        assert not (await other.acquire("gone", quota, 0)).allowed
        held = await alive.acquire("busy", quota, 0)
        assert held.allowed
        await asyncio.sleep(0.7)
        assert (await other.acquire("gone", quota, 0)).allowed  # the lease ran out
        assert not (await other.acquire("busy", quota, 0)).allowed  # still renewed
        await alive.settle("busy", quota, held.lease, 0)
        assert (await other.acquire("busy", quota, 0)).allowed
    finally:
        await alive.close()
        await other.close()


async def test_redis_keys_expire_when_buckets_are_full_again(redis_prefix: str) -> None:
    lim = RedisLimiter(connect(REDIS_URL), redis_prefix)
    try:
        await lim.acquire("k", Quota(requests_per_minute=60, tokens_per_minute=6000), 10)
        keys = sorted([k.decode() async for k in lim.client.scan_iter(match=redis_prefix + "*")])
        assert keys == [f"{redis_prefix}rl:{{k}}:req", f"{redis_prefix}rl:{{k}}:tok"]
        ttl = await lim.client.pttl(keys[0])
        assert 0 < ttl <= 2000  # one second of debt, plus a second of slack
    finally:
        await lim.close()
