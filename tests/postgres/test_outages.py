"""The PostgreSQL store taken away and brought back, mid-run and at start: requests
keep flowing under on_store_error: allow, 503 under deny, never a 500; the limits are
exact again once the server answers. (Each test asks for its server before its proxy,
so that the proxy stops, flushing its session writes, while the server is there.)"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import yaml
from aiohttp import web

from proxy.chain import BuildContext
from proxy.config import Limits
from proxy.exchange import Exchange, Handler, Identity, Middleware
from tests.fixtures import Backend, ProxyFactory, chat_body, completion
from tests.postgres.server import PostgresServer
from tests.ratelimit.test_middleware_redis import store_warnings, until_limited
from tests.sessions.fixtures import chat, config, fetch, user

Client = Any


def as_key(options: dict[str, Any], ctx: BuildContext) -> Middleware:
    """Stands in for auth: the caller is the key named in X-Test-Key, if any, with the
    session scopes; key `s` (the sessions' checks) has limits of its own, far off."""
    roomy = Limits(requests_per_minute=100_000)

    async def middleware(ex: Exchange, call_next: Handler) -> web.StreamResponse:
        key = ex.request.headers.get("X-Test-Key")
        if key:
            ex.identity = Identity(
                id=key,
                scopes=frozenset({"chat", "sessions:read", "sessions:write"}),
                limits=roomy if key == "s" else None,
            )
        return await call_next(ex)

    return middleware


def chain(dsn: str, policy: str, url: str = "echo:", **limits: int) -> str:
    """auth (a stand-in), rate_limit (3 a minute unless told), session, on PostgreSQL."""
    rate_limit: dict[str, Any] = {"type": "rate_limit", "on_store_error": policy}
    rate_limit.update(limits or {"requests_per_minute": 3})
    doc = yaml.safe_load(config({"backend": "postgres", "dsn": dsn}, url=url, before=[rate_limit]))
    doc["middleware"][0] = {"type": "tests.postgres.test_outages:as_key"}
    return yaml.safe_dump(doc, sort_keys=False)


async def until_found(client: Client, sid: str, turns: int, key: str) -> dict[str, Any]:
    """The session once the writer has recorded `turns` turns of it (bounded)."""
    for _ in range(200):
        status, doc = await fetch(client, sid, key)
        if status == 200 and doc["turn_count"] >= turns:
            return doc
        await asyncio.sleep(0.05)
    raise AssertionError(f"session {sid} not recorded: {status} {doc}")


async def statuses_of(client: Client, n: int, key: str | None = None) -> list[int]:
    headers = {"X-Test-Key": key} if key else {}
    out = []
    for _ in range(n):
        resp = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
        await resp.read()
        out.append(resp.status)
    return out


async def test_stopped_mid_run_allow_keeps_requests_flowing_then_limits_return(
    own_pg: PostgresServer, make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_proxy(chain(own_pg.new_database(), "allow"))
    assert await until_limited(client) == [200, 200, 200, 429]
    sid, _ = await chat(client, [user("before")], key="s")
    await until_found(client, sid, 1, "s")

    await asyncio.to_thread(own_pg.stop)
    with caplog.at_level(logging.WARNING, logger="chat_proxy.rate_limit"):
        assert await statuses_of(client, 20) == [200] * 20
    assert store_warnings(caplog) == [
        "rate-limit store unreachable; requests are let through unlimited (on_store_error: allow)"
    ]
    # the session chain, the Sessions API and the Responses API while the store is gone
    sid2, doc = await chat(client, [user("during")], key="s")
    assert doc["choices"][0]["message"]["content"] == "You said: during"
    resp = await client.post(
        "/v1/responses", json={"model": "echo", "input": "hi"}, headers={"X-Test-Key": "s"}
    )
    assert resp.status == 200, await resp.text()
    assert (await fetch(client, sid, "s"))[0] == 503
    ready = await client.get("/readyz")
    assert ready.status == 503 and (await ready.json())["store"] == "down"

    await asyncio.to_thread(own_pg.start)
    # a fast shutdown keeps the counters: the key is still at its limit
    statuses = await until_limited(client)
    assert statuses[-1] == 429 and set(statuses) <= {200, 429}
    assert (await client.get("/readyz")).status == 200
    # what was recorded before is there, and new turns are written again
    sid3, _ = await chat(client, [user("after")], key="s")
    doc = await until_found(client, sid3, 1, "s")
    assert doc["turns"][0]["messages"] == [user("after")]
    assert (await until_found(client, sid, 1, "s"))["turns"][0]["messages"] == [user("before")]


async def test_crashed_mid_run_deny_refuses_with_503_then_limits_return(
    own_pg: PostgresServer,
    make_proxy: ProxyFactory,
    backend: Backend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await make_proxy(chain(own_pg.new_database(), "deny", url="{backend}"), backend)
    assert (await client.post("/v1/chat/completions", json=chat_body())).status == 200
    await asyncio.to_thread(own_pg.stop, "immediate")
    seen = len(backend.seen)
    with caplog.at_level(logging.WARNING, logger="chat_proxy.rate_limit"):
        for _ in range(10):
            resp = await client.post("/v1/chat/completions", json=chat_body())
            assert resp.status == 503
            err = (await resp.json())["error"]
            assert err["code"] == "rate_limit_store_unavailable"
            assert "store is unreachable" in err["message"]
    assert len(backend.seen) == seen
    assert len(store_warnings(caplog)) == 1
    await asyncio.to_thread(own_pg.start)
    # after a crash the server starts its unlogged counters empty: the counts start again
    statuses = await until_limited(client)
    assert set(statuses) <= {503, 200, 429}
    assert statuses[-4:] == [200, 200, 200, 429]


async def test_down_at_start_the_proxy_starts_degraded_and_recovers(
    own_pg: PostgresServer, make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = own_pg.new_database()  # empty: the schema is made once the server answers
    own_pg.stop()
    with caplog.at_level(logging.WARNING):
        client = await make_proxy(chain(dsn, "allow"))
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("the PostgreSQL store does not answer yet") for m in messages)
    assert any(m.startswith("rate-limit store unreachable at start-up") for m in messages)
    ready = await client.get("/readyz")
    assert ready.status == 503 and (await ready.json())["store"] == "down"
    assert await statuses_of(client, 10) == [200] * 10
    await chat(client, [user("while down")], key="s")

    await asyncio.to_thread(own_pg.start)
    for _ in range(100):
        if (await client.get("/readyz")).status == 200:
            break
        await asyncio.sleep(0.05)
    assert (await client.get("/readyz")).status == 200
    assert (await until_limited(client))[-4:] == [200, 200, 200, 429]
    sid, _ = await chat(client, [user("back")], key="s")
    assert (await until_found(client, sid, 1, "s"))["turns"][0]["messages"] == [user("back")]


async def test_the_store_dying_during_a_request_never_fails_it(
    own_pg: PostgresServer,
    make_proxy: ProxyFactory,
    backend: Backend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def stops_postgres(request: web.Request) -> web.StreamResponse:
        await asyncio.to_thread(own_pg.stop)  # admitted with the server up, settled without
        return web.json_response(completion())

    backend.chat(stops_postgres)
    text = chain(
        own_pg.new_database(),
        "allow",
        url="{backend}",
        requests_per_minute=3,
        tokens_per_minute=1000,
        max_concurrent=2,
    )
    client = await make_proxy(text, backend)
    with caplog.at_level(logging.WARNING, logger="chat_proxy.rate_limit"):
        resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=5))
        assert resp.status == 200
        assert resp.headers["x-ratelimit-remaining-requests"] == "2"
        assert (await resp.json())["object"] == "chat.completion"
        for _ in range(40):
            if store_warnings(caplog):
                break
            await asyncio.sleep(0.05)
    assert store_warnings(caplog) == [
        "rate-limit store unreachable; a finished request was not settled"
    ]
    # back, so that the turn the session writer holds is written as the proxy stops
    await asyncio.to_thread(own_pg.start)
