"""The limiter contract: one suite run against the in-process limiter (with a fake
clock), the Redis limiter (the real server at 127.0.0.1:6379, real time) and the
PostgreSQL limiter (a server the tests start, real time)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from proxy.config import StoreConfig
from proxy.pgstore import open_database
from proxy.ratelimit import Limiter, Quota
from proxy.ratelimit.local import MemoryLimiter
from proxy.ratelimit.postgres import PostgresLimiter
from proxy.ratelimit.redis import RedisLimiter, connect, open_limiter
from tests.postgres import server as postgres
from tests.ratelimit.fixtures import REDIS_URL, FakeClock, drop_keys, require_redis


@dataclass
class Subject:
    limiter: Limiter
    tick: Callable[[float], Awaitable[None]]  # let time pass
    kind: str


@pytest.fixture(params=["memory", "redis", "redis-sentinel", "redis-cluster", "postgres"])
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    if request.param == "memory":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.now += seconds

        mem = MemoryLimiter(clock=clock)
        yield Subject(mem, advance, "memory")
        await mem.close()
        return
    if request.param == "postgres":
        db = await open_database(postgres.shared().new_database())
        pg = PostgresLimiter(db, owns_db=True)
        yield Subject(pg, asyncio.sleep, "postgres")
        await pg.close()
        return
    prefix = f"test-rl-{uuid.uuid4().hex[:8]}:"
    if request.param != "redis":
        # a deployment of its own (tests/redis_ha), on the limiter's own connections
        deployment = request.getfixturevalue(request.param.replace("-", "_"))
        ha = open_limiter(StoreConfig(**deployment.store_config(prefix)), None)
        yield Subject(ha, asyncio.sleep, request.param)
        await ha.close()
        return
    require_redis()
    red = RedisLimiter(connect(REDIS_URL), prefix)
    yield Subject(red, asyncio.sleep, "redis")
    await drop_keys(prefix)
    await red.close()


async def test_requests_burst_then_refused(subject: Subject) -> None:
    quota = Quota(requests_per_minute=5)
    remaining = []
    for _ in range(5):
        d = await subject.limiter.acquire("k", quota, 0)
        assert d.allowed and d.requests is not None
        remaining.append(d.requests.remaining)
    assert remaining == [4, 3, 2, 1, 0]
    d = await subject.limiter.acquire("k", quota, 0)
    assert not d.allowed
    assert d.exceeded == ("requests",)
    # one request comes back every 12 s: the sixth may come in about 12 s
    assert 11 < d.retry_after <= 12
    assert d.requests is not None and d.requests.limit == 5 and d.requests.remaining == 0
    assert 59 < d.requests.reset <= 60


async def test_units_come_back_one_interval_at_a_time(subject: Subject) -> None:
    # 120 tokens a minute: one every 0.5 s; no second full burst after the first
    quota = Quota(tokens_per_minute=120)
    assert (await subject.limiter.acquire("k", quota, 120)).allowed
    d = await subject.limiter.acquire("k", quota, 1)
    assert not d.allowed and d.exceeded == ("tokens",)
    assert 0.3 < d.retry_after <= 0.5
    await subject.tick(0.6)
    assert (await subject.limiter.acquire("k", quota, 1)).allowed
    assert not (await subject.limiter.acquire("k", quota, 1)).allowed


async def test_token_cost_and_remaining(subject: Subject) -> None:
    quota = Quota(tokens_per_minute=1000)
    d = await subject.limiter.acquire("k", quota, 600)
    assert d.allowed and d.tokens is not None
    assert d.tokens.limit == 1000 and d.tokens.remaining == 400
    assert 35.9 < d.tokens.reset <= 36  # 600 tokens at 60 ms each
    d = await subject.limiter.acquire("k", quota, 500)
    assert not d.allowed and d.exceeded == ("tokens",)
    assert 5.8 < d.retry_after <= 6  # 100 tokens short
    assert (await subject.limiter.acquire("k", quota, 400)).allowed


async def test_all_or_nothing(subject: Subject) -> None:
    both = Quota(requests_per_minute=10, tokens_per_minute=100)
    assert (await subject.limiter.acquire("k", both, 100)).allowed
    d = await subject.limiter.acquire("k", both, 10)
    assert not d.allowed and d.exceeded == ("tokens",)
    # the refused request took no request either: 10 - 1 (first) - 1 (this one)
    d = await subject.limiter.acquire("k", Quota(requests_per_minute=10), 0)
    assert d.requests is not None and d.requests.remaining == 8


async def test_every_exceeded_limit_is_named(subject: Subject) -> None:
    quota = Quota(requests_per_minute=1, tokens_per_minute=60, max_concurrent=1)
    first = await subject.limiter.acquire("k", quota, 60)
    assert first.allowed and first.lease is not None
    d = await subject.limiter.acquire("k", quota, 30)
    assert not d.allowed
    assert d.exceeded == ("concurrent", "requests", "tokens")
    assert 59 < d.retry_after <= 60  # the longest wait: the next request


async def test_concurrency_slots(subject: Subject) -> None:
    quota = Quota(max_concurrent=2)
    a = await subject.limiter.acquire("k", quota, 0)
    b = await subject.limiter.acquire("k", quota, 0)
    assert a.allowed and b.allowed and b.in_flight == 2
    c = await subject.limiter.acquire("k", quota, 0)
    assert not c.allowed and c.exceeded == ("concurrent",)
    assert (await subject.limiter.acquire("other", quota, 0)).allowed
    await subject.limiter.settle("k", quota, a.lease, 0)
    d = await subject.limiter.acquire("k", quota, 0)
    assert d.allowed and d.in_flight == 2


async def test_settle_refunds_and_charges(subject: Subject) -> None:
    quota = Quota(tokens_per_minute=100)
    d = await subject.limiter.acquire("k", quota, 100)
    assert d.allowed
    await subject.limiter.settle("k", quota, None, -60)  # it used 40
    d = await subject.limiter.acquire("k", quota, 60)
    assert d.allowed and d.tokens is not None and d.tokens.remaining == 0
    assert not (await subject.limiter.acquire("k", quota, 1)).allowed

    await subject.limiter.settle("k2", quota, None, -50)  # a refund never adds credit
    d = await subject.limiter.acquire("k2", quota, 100)
    assert d.allowed and d.tokens is not None and d.tokens.remaining == 0

    assert (await subject.limiter.acquire("k3", quota, 10)).allowed
    await subject.limiter.settle("k3", quota, None, 90)  # it used 100
    d = await subject.limiter.acquire("k3", quota, 1)
    assert not d.allowed and d.tokens is not None and d.tokens.remaining == 0


async def test_keys_are_independent(subject: Subject) -> None:
    quota = Quota(requests_per_minute=1)
    assert (await subject.limiter.acquire("a", quota, 0)).allowed
    assert not (await subject.limiter.acquire("a", quota, 0)).allowed
    assert (await subject.limiter.acquire("b", quota, 0)).allowed
    assert (await subject.limiter.acquire("ip:10.0.0.1", quota, 0)).allowed
