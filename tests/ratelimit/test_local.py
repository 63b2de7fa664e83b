"""The in-process limiter on its own: what only a fake clock can show."""

from __future__ import annotations

from proxy.ratelimit import Quota
from proxy.ratelimit.local import MemoryLimiter
from tests.ratelimit.fixtures import FakeClock


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
