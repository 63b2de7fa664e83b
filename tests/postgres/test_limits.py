"""The PostgreSQL limiter with the limits people write to mean "no limit"."""

from __future__ import annotations

import asyncio

from proxy.pgstore import open_database
from proxy.ratelimit import Quota
from proxy.ratelimit.postgres import PostgresLimiter


async def test_limits_beyond_32_and_64_bits_are_counted(pg_dsn: str) -> None:
    limiter = PostgresLimiter(await open_database(pg_dsn), owns_db=True)
    try:
        huge = Quota(
            requests_per_minute=100_000_000,
            tokens_per_minute=1_000_000_000_000,
            max_concurrent=100_000,
        )
        d = await limiter.acquire("k", huge, 3_000_000_000)
        assert d.allowed and d.lease is not None and d.in_flight == 1
        assert d.tokens is not None and d.tokens.remaining == 1_000_000_000_000 - 3_000_000_000
        await limiter.settle("k", huge, d.lease, -2_999_999_000)
        beyond = Quota(requests_per_minute=10**30, tokens_per_minute=10**25)
        d = await limiter.acquire("k2", beyond, 10**20)
        assert d.allowed
        await limiter.settle("k2", beyond, None, 10**21)
    finally:
        await limiter.close()


async def test_a_dead_replicas_slots_come_back_when_its_leases_expire(pg_dsn: str) -> None:
    quota = Quota(max_concurrent=2)
    dead = PostgresLimiter(await open_database(pg_dsn), lease=0.3, owns_db=True)
    live = PostgresLimiter(await open_database(pg_dsn), lease=0.3, owns_db=True)
    try:
        assert (await dead.acquire("k", quota, 0)).allowed
        assert (await dead.acquire("k", quota, 0)).allowed
        await dead.close()  # gone without settling: nobody renews its leases
        refused = await live.acquire("k", quota, 0)
        assert not refused.allowed and refused.exceeded == ("concurrent",)
        await asyncio.sleep(0.4)
        back = await live.acquire("k", quota, 0)
        assert back.allowed and back.in_flight == 1  # counted again: only its own
        assert (await live.acquire("k", quota, 0)).allowed
        assert not (await live.acquire("k", quota, 0)).allowed
    finally:
        await live.close()


async def test_the_sweep_drops_expired_leases_and_idle_counters(pg_dsn: str) -> None:
    limiter = PostgresLimiter(await open_database(pg_dsn), lease=0.2, owns_db=True)
    try:
        held = await limiter.acquire("held", Quota(max_concurrent=5), 0)
        await limiter.acquire("idle", Quota(requests_per_minute=6000), 0)  # full in 10 ms
        await limiter.acquire("busy", Quota(requests_per_minute=1), 0)  # full in a minute
        limiter._held.clear()  # as if its replica were gone: no renewal
        await asyncio.sleep(0.3)
        await limiter.sweep()
        keys = {r["key"] for r in await limiter.db.fetch(5, "SELECT key FROM chat_proxy.limits")}
        leases = await limiter.db.fetchval(5, "SELECT count(*) FROM chat_proxy.leases")
        assert leases == 0
        # the held key's count still says 1 (a check at its limit counts again), so its
        # row stays; the idle one is gone, the busy one is kept
        assert keys == {"held", "busy"}
        assert held.lease is not None
    finally:
        await limiter.close()
