"""The session lookup sent in the rate limiter's round trip to Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from tests.fixtures import BASIC, Backend, ProxyFactory
from tests.ratelimit.fixtures import REDIS_URL, drop_keys, require_redis


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    require_redis()
    p = f"test-la-{uuid.uuid4().hex[:8]}:"
    yield p
    await drop_keys(p)


def config(prefix: str) -> str:
    return BASIC + (
        f'store: {{backend: redis, url: "{REDIS_URL}", prefix: "{prefix}"}}\n'
        "middleware:\n"
        "  - type: tests.ratelimit.fixtures:keyed\n"
        "  - type: rate_limit\n"
        "    requests_per_minute: 1000\n"
        "    max_concurrent: 10\n"
        "  - type: session\n"
    )


async def turn(client: object, messages: list[dict[str, str]]) -> str:
    resp = await client.post(  # type: ignore[attr-defined]
        "/v1/chat/completions",
        json={"model": "test-model", "messages": messages},
        headers={"X-Test-Key": "a"},
    )
    assert resp.status == 200, await resp.text()
    await resp.read()
    return str(resp.headers["X-Session-Id"])


@pytest.mark.parametrize("flush_scripts", [False, True])
async def test_a_continued_conversation_is_found_with_the_check(
    make_proxy: ProxyFactory, backend: Backend, prefix: str, flush_scripts: bool
) -> None:
    client = await make_proxy(config(prefix), backend)
    first = [{"role": "user", "content": "Hi"}]
    sid = await turn(client, first)
    reply = {"role": "assistant", "content": "Hello!"}
    await asyncio.sleep(0.3)  # the turn written, not only queued
    if flush_scripts:
        r = Redis.from_url(REDIS_URL)
        await r.script_flush()
        await r.aclose()
    again = await turn(client, [*first, reply, {"role": "user", "content": "More?"}])
    assert again == sid
