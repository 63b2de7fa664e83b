"""The limiter logic, one suite run against the in-process limiter (with a fake
clock) and the Redis limiter (the real server at 127.0.0.1:6379, real time)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from proxy.ratelimit import Limiter, Quota, format_reset
from proxy.ratelimit.memory import MemoryLimiter
from proxy.ratelimit.redis import RedisLimiter, connect
from tests.integration.test_rate_limit import REDIS_URL, drop_keys, require_redis


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Subject:
    limiter: Limiter
    tick: Callable[[float], Awaitable[None]]  # let time pass
    kind: str


@pytest.fixture(params=["memory", "redis"])
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    if request.param == "memory":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.now += seconds

        mem = MemoryLimiter(clock=clock)
        yield Subject(mem, advance, "memory")
        await mem.close()
        return
    require_redis()
    prefix = f"test-rl-{uuid.uuid4().hex[:8]}:"
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


async def test_no_second_burst_at_a_minute_boundary() -> None:
    clock = FakeClock()
    lim = MemoryLimiter(clock=clock)
    quota = Quota(requests_per_minute=60)
    clock.now += 59.9
    assert all([(await lim.acquire("k", quota, 0)).allowed for _ in range(60)])
    clock.now += 0.2  # a fixed window would restart here and admit 60 more
    admitted = sum([(await lim.acquire("k", quota, 0)).allowed for _ in range(60)])
    assert admitted == 0
    clock.now += 1.0
    admitted = sum([(await lim.acquire("k", quota, 0)).allowed for _ in range(60)])
    assert admitted == 1
    clock.now += 60
    admitted = sum([(await lim.acquire("k", quota, 0)).allowed for _ in range(100)])
    assert admitted == 60


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


# --- Redis only ----------------------------------------------------------------


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


# --- the reset format -----------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.02, "20ms"),
        (0.0201, "21ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (12.25, "12.25s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (90.5, "1m30.5s"),
        (3723, "1h2m3s"),
    ],
)
def test_reset_format_is_openais(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text
