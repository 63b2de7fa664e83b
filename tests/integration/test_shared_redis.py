"""One Redis pool per proxy: the session store and the rate-limit counters share the
connections the application opened once."""

from __future__ import annotations

import uuid

import redis.asyncio as aioredis

from proxy.app import STATE
from tests.fixtures import BASIC, Backend, ProxyFactory, chat_body
from tests.ratelimit.fixtures import REDIS_URL, drop_keys, require_redis


async def test_sessions_and_counters_share_one_pool(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    require_redis()
    prefix = f"chat-proxy-test-{uuid.uuid4().hex[:8]}:"
    text = (
        BASIC
        + f"""
store: {{backend: redis, url: "{REDIS_URL}", prefix: "{prefix}"}}
middleware:
  - type: rate_limit
    requests_per_minute: 1000
  - type: session
"""
    )
    client = await make_proxy(text, backend)
    try:
        for _ in range(3):
            resp = await client.post("/v1/chat/completions", json=chat_body())
            assert resp.status == 200
            assert resp.headers["x-ratelimit-limit-requests"] == "1000"
        sid = resp.headers["X-Session-Id"]
        assert (await client.get(f"/v1/sessions/{sid}")).status == 200
        # both wrote to Redis: the counters' keys and the session's, under the prefix
        raw = aioredis.from_url(REDIS_URL)
        try:
            keys = [k.decode() async for k in raw.scan_iter(match=prefix + "*")]
        finally:
            await raw.aclose()
        assert any(":rl:" in k for k in keys), keys
        assert any(":session:" in k for k in keys), keys
        # ... through the one pool the application opened
        ctx = client.server.app[STATE].runtime.ctx
        pool = ctx.redis
        assert pool is not None
        assert ctx.store is not None
        assert ctx.store._r.connection_pool is pool  # type: ignore[attr-defined]
        limiters = [
            cell.cell_contents
            for _, feature in client.server.app[STATE].runtime.chain.entries
            for hook in feature.startup
            for cell in (hook.__closure__ or ())
            if type(cell.cell_contents).__name__ == "_Holder"
        ]
        [holder] = limiters
        assert holder.limiter.client.connection_pool is pool
    finally:
        await drop_keys(prefix)


async def test_send_answers_each_command_in_order_an_error_in_its_place() -> None:
    require_redis()
    from redis.exceptions import ResponseError

    from proxy.shared_redis import send

    key = f"chat-proxy-test-send-{uuid.uuid4().hex[:8]}"
    client = aioredis.from_url(REDIS_URL, decode_responses=True)
    try:
        replies = await send(
            client,
            [("SET", key, "héllo"), ("INCR", key), ("GET", key), ("DEL", key)],
        )
        assert replies[0] is True or replies[0] == "OK"
        assert isinstance(replies[1], ResponseError)
        assert replies[2] == "héllo"
        assert replies[3] == 1
    finally:
        await client.delete(key)
        await client.aclose()


async def test_a_caller_that_gives_up_leaves_no_reply_for_the_next() -> None:
    """A send whose caller is cancelled runs to its reply, which is dropped: it never
    answers the command sent after it."""
    require_redis()
    import asyncio

    from proxy.shared_redis import send

    key = f"chat-proxy-test-send-{uuid.uuid4().hex[:8]}"
    client = aioredis.from_url(REDIS_URL, decode_responses=True)
    other = aioredis.from_url(REDIS_URL, decode_responses=True)
    try:
        await other.set(key + ":v", "mine")
        waiting = asyncio.ensure_future(send(client, [("BLPOP", key, 2)]))
        await asyncio.sleep(0.2)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert waiting.cancelled()
        await other.rpush(key, "late")  # what the BLPOP takes, for nobody
        for _ in range(3):
            assert await send(client, [("GET", key + ":v")]) == ["mine"]
        await asyncio.sleep(0.3)
        assert await other.llen(key) == 0  # taken by the BLPOP that was sent
    finally:
        await other.delete(key, key + ":v")
        await other.aclose()
        await client.aclose()


async def test_sends_of_one_turn_share_a_write_and_each_gets_its_own_replies() -> None:
    require_redis()
    import asyncio

    from proxy.shared_redis import send

    prefix = f"chat-proxy-test-send-{uuid.uuid4().hex[:8]}"
    client = aioredis.from_url(REDIS_URL, decode_responses=True)
    try:
        results = await asyncio.gather(
            *(
                send(client, [("INCRBY", f"{prefix}:{i}", i), ("GET", f"{prefix}:{i}")])
                for i in range(50)
            )
        )
        assert results == [[i, str(i)] for i in range(50)]
    finally:
        await client.delete(*(f"{prefix}:{i}" for i in range(50)))
        await client.aclose()
