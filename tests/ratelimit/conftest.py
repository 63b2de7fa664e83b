"""Fixtures of the rate-limit tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from tests.ratelimit.fixtures import REDIS_URL, drop_keys, require_redis


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """The store section of the config: counters in memory, or in the real Redis."""
    if request.param == "memory":
        yield "store: {backend: memory}\n"
        return
    require_redis()
    prefix = f"test-rl-{uuid.uuid4().hex[:8]}:"
    yield f'store: {{backend: redis, url: "{REDIS_URL}", prefix: "{prefix}"}}\n'
    await drop_keys(prefix)
