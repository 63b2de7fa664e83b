"""Store outages on Redis: a redis-server of the test's own, stopped and started under
a proxy (in this process, in front of the stand-in backend).

Gone at start: the proxy starts, /readyz says the store is down, requests flow under
on_store_error: allow. Gone mid-run and back: requests keep flowing under allow and
get 503 under deny, never a 500; the session turns answered meanwhile are kept and
written once the store is back, each once; past the bound they are dropped, counted
(chat_proxy_session_turns_dropped_total) and logged."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.sessions import writer as writer_module
from tests.fixtures import BASIC, Backend, ProxyFactory, chat_body, metric
from tests.redis_ha.servers import Server


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[Server]:
    """A durable redis-server (its data survive a restart), not started yet."""
    server = Server(tmp_path, durable=True)
    yield server
    await asyncio.to_thread(server.stop)


def proxy_config(server: Server, policy: str) -> str:
    store = {"backend": "redis", "url": server.url, "prefix": "o:"}
    return (
        BASIC
        + f"store: {json.dumps(store)}\n"
        + f"""
middleware:
  - type: rate_limit
    requests_per_minute: 1000
    on_store_error: {policy}
  - type: session
"""
    )


async def chat(client: Any, text: str, session: str | None = None) -> Any:
    headers = {"X-Session-Id": session} if session else {}
    return await client.post("/v1/chat/completions", json=chat_body(text), headers=headers)


async def texts_of(client: Any, sid: str, want: int, timeout: float = 5) -> list[str]:
    """The session's turns' texts, once it has `want` of them (or the time is up)."""
    deadline = time.monotonic() + timeout
    while True:
        resp = await client.get(f"/v1/sessions/{sid}")
        if resp.status == 200:
            got = await resp.json()
            if got["turn_count"] >= want or time.monotonic() > deadline:
                return [t["messages"][0]["content"] for t in got["turns"]]
        elif time.monotonic() > deadline:
            raise AssertionError(f"the session could not be read: {resp.status}")
        await asyncio.sleep(0.1)


async def scrape(client: Any, name: str, **labels: str) -> float:
    return metric(await (await client.get("/metrics")).text(), name, **labels)


async def pending(client: Any, at_least: int) -> float:
    """chat_proxy_session_turns_pending once it reaches `at_least` (the writer sets it
    when a write fails), or after a second."""
    for _ in range(20):
        value = await scrape(client, "chat_proxy_session_turns_pending")
        if value >= at_least:
            break
        await asyncio.sleep(0.05)
    return value


async def test_redis_gone_at_start_starts_degraded_then_catches_up(
    redis_server: Server, make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(proxy_config(redis_server, "allow"), backend)
    ready = await client.get("/readyz")
    assert ready.status == 503 and (await ready.json())["store"] == "down"
    # unlimited while the store is away, and the turns kept
    assert [(await chat(client, f"t{i}", "conv")).status for i in range(5)] == [200] * 5
    assert await pending(client, 5) == 5

    await asyncio.to_thread(redis_server.start)
    for _ in range(40):
        ready = await client.get("/readyz")
        if ready.status == 200:
            break
        await asyncio.sleep(0.05)
    assert ready.status == 200 and (await ready.json())["store"] == "ok"
    assert await texts_of(client, "conv", 5) == [f"t{i}" for i in range(5)]
    # the limits count again (once the limiter's second of rest after a failure is
    # over): a counted answer says what is left
    for _ in range(40):
        resp = await chat(client, "x")
        if "x-ratelimit-remaining-requests" in resp.headers:
            break
        await asyncio.sleep(0.05)
    left = int(resp.headers["x-ratelimit-remaining-requests"])
    assert int((await chat(client, "y")).headers["x-ratelimit-remaining-requests"]) == left - 1


async def test_redis_gone_mid_run_and_back_loses_no_turn_and_never_fails_a_request(
    redis_server: Server, make_proxy: ProxyFactory, backend: Backend
) -> None:
    await asyncio.to_thread(redis_server.start)
    allow = await make_proxy(proxy_config(redis_server, "allow"), backend)
    deny = await make_proxy(proxy_config(redis_server, "deny"), backend)
    sent = [f"before {i}" for i in range(3)]
    for text in sent:
        assert (await chat(allow, text, "conv")).status == 200
    assert await texts_of(allow, "conv", 3) == sent
    assert (await chat(deny, "counted")).status == 200

    await asyncio.to_thread(redis_server.stop)
    statuses: dict[str, list[int]] = {"allow": [], "deny": [], "other": []}
    for i in range(20):
        sent.append(f"during {i}")
        statuses["allow"].append((await chat(allow, sent[-1], "conv")).status)
        resp = await chat(deny, "refused")
        statuses["deny"].append(resp.status)
        assert resp.headers.get("Retry-After") == "1"
    # the other routes that reach the store answer without it too
    statuses["other"].append((await allow.get("/v1/sessions/conv")).status)
    statuses["other"].append((await allow.get("/v1/sessions")).status)
    responses = await allow.post(
        "/v1/responses", json={"model": "test-model", "input": "hi", "store": True}
    )
    statuses["other"].append(responses.status)
    assert statuses["allow"] == [200] * 20
    assert statuses["deny"] == [503] * 20
    assert 500 not in statuses["other"] and responses.status == 200, statuses
    # the 20 turns of conv, and the Responses request's (a session of its own)
    assert await pending(allow, 21) == 21

    await asyncio.to_thread(redis_server.start)  # the same data (append-only file)
    assert await texts_of(allow, "conv", len(sent)) == sent  # each once, in order
    assert await scrape(allow, "chat_proxy_session_turns_pending") == 0
    for _ in range(40):  # deny lets requests through again once the store answers
        resp = await chat(deny, "again")
        if resp.status != 503:
            break
        await asyncio.sleep(0.05)
    assert resp.status == 200


async def test_turns_past_the_bound_are_dropped_counted_and_logged(
    redis_server: Server,
    make_proxy: ProxyFactory,
    backend: Backend,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(writer_module, "MAX_PENDING", 5)
    await asyncio.to_thread(redis_server.start)
    client = await make_proxy(proxy_config(redis_server, "allow"), backend)
    before = await scrape(client, "chat_proxy_session_turns_dropped_total", reason="queue_full")
    await asyncio.to_thread(redis_server.stop)
    with caplog.at_level(logging.ERROR, logger="chat_proxy.session"):
        for i in range(12):
            assert (await chat(client, f"t{i}", "conv")).status == 200
            await asyncio.sleep(0.01)
    dropped = (
        await scrape(client, "chat_proxy_session_turns_dropped_total", reason="queue_full") - before
    )
    assert dropped >= 12 - 5 - writer_module.BATCH and dropped >= 1
    [logged] = [r.getMessage() for r in caplog.records if "falling behind" in r.getMessage()]
    assert "the store is unavailable" in logged and "dropped" in logged

    await asyncio.to_thread(redis_server.start)
    kept = await texts_of(client, "conv", 12 - int(dropped))
    # what was kept is written, once each and in order; the rest were the later turns
    assert len(kept) == 12 - dropped
    assert kept == [f"t{i}" for i in range(len(kept))]
