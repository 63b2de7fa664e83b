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
