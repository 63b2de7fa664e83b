"""Hedged requests (`hedge.after_ms`): a chat request with no first byte after that
long also goes to another replica or upstream; the first to answer wins, the other
is cancelled at once (its backend sees the request go), and the client sees one
answer, counted once."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.fixtures import DONE, ProxyFactory, chat_body, chunk, completion, metric

_names = itertools.count()


def unique(prefix: str) -> str:
    """An upstream name of its own: each test reads only its own metric series."""
    return f"{prefix}{next(_names)}"


@dataclass
class Replica:
    """A stand-in that answers after `delay` seconds and notes arrivals and requests
    cancelled before their answer."""

    name: str
    delay: float = 0.0
    status: int = 200
    arrived: list[dict[str, Any]] = field(default_factory=list)
    cancelled: list[float] = field(default_factory=list)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/v1"))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.arrived.append(body)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled.append(time.monotonic())
            raise
        if self.status != 200:
            return web.json_response({"error": {"message": "down"}}, status=self.status)
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(chunk(f"from {self.name}") + DONE)
            await resp.write_eof()
            return resp
        return web.json_response(completion(f"from {self.name}"))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.arrived.append(await request.json())
        await asyncio.sleep(self.delay)
        return web.json_response({"object": "text_completion", "choices": []})


@pytest.fixture
async def replicas() -> AsyncIterator[list[Replica]]:
    started: list[Replica] = []
    for name in ("slow", "fast"):
        r = Replica(name)
        app = web.Application(handler_args={"handler_cancellation": True})
        app.router.add_post("/v1/chat/completions", r.chat)
        app.router.add_post("/v1/completions", r.completions)
        r.server = TestServer(app)
        await r.server.start_server()
        started.append(r)
    yield started
    for r in started:
        assert r.server is not None
        await r.server.close()


def fleet(
    slow: Replica, fast: Replica, after_ms: int = 100, extra: str = "", name: str = "hedged"
) -> str:
    # round_robin: the first request goes to replica 0, the slow one
    return f"""
upstreams:
  - name: {name}
    replicas: [{slow.url}, {fast.url}]
    balance: round_robin
    hedge: {{after_ms: {after_ms}}}
    timeouts: {{connect: 2, first_byte: 5, idle: 5}}
{extra}"""


async def test_a_slow_first_replica_is_hedged_and_the_fast_answer_wins(
    make_proxy: ProxyFactory, replicas: list[Replica]
) -> None:
    slow, fast = replicas
    slow.delay = 2.0
    name = unique("hedged")
    client = await make_proxy(fleet(slow, fast, name=name))
    started = time.monotonic()
    resp = await client.post("/v1/chat/completions", json=chat_body())
    took = time.monotonic() - started
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["message"]["content"] == "from fast"
    assert resp.headers["x-upstream-replica"] == "1"
    assert resp.headers["x-upstream-attempts"] == "2"
    assert 0.1 <= took < 1.0
    # the slow one got it and saw it cancelled, at once
    await asyncio.sleep(0.2)
    assert len(slow.arrived) == 1 and len(slow.cancelled) == 1
    assert len(fast.arrived) == 1
    text = await (await client.get("/metrics")).text()
    assert metric(text, "chat_proxy_hedges_total", upstream=name, winner="hedge") == 1


async def test_a_stream_is_relayed_from_the_winner_alone(
    make_proxy: ProxyFactory, replicas: list[Replica]
) -> None:
    slow, fast = replicas
    slow.delay = 2.0
    client = await make_proxy(fleet(slow, fast))
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status == 200
    assert await resp.read() == chunk("from fast") + DONE
    await asyncio.sleep(0.2)
    assert slow.cancelled


async def test_an_answer_before_the_hedge_time_goes_alone(
    make_proxy: ProxyFactory, replicas: list[Replica]
) -> None:
    slow, fast = replicas
    slow.delay = 0.02
    client = await make_proxy(fleet(slow, fast, after_ms=300))
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert (await resp.json())["choices"][0]["message"]["content"] == "from slow"
    assert "x-upstream-attempts" not in resp.headers
    assert fast.arrived == [] and slow.cancelled == []


async def test_when_the_first_answers_first_the_hedge_is_cancelled(
    make_proxy: ProxyFactory, replicas: list[Replica]
) -> None:
    slow, fast = replicas
    slow.delay = 0.3  # over the hedge time, but before the second
    fast.delay = 2.0
    name = unique("hedged")
    client = await make_proxy(fleet(slow, fast, after_ms=100, name=name))
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert (await resp.json())["choices"][0]["message"]["content"] == "from slow"
    assert resp.headers["x-upstream-replica"] == "0"
    await asyncio.sleep(0.2)
    assert len(fast.arrived) == 1 and len(fast.cancelled) == 1
    text = await (await client.get("/metrics")).text()
    assert metric(text, "chat_proxy_hedges_total", upstream=name, winner="first") == 1


async def test_passthrough_routes_are_never_hedged(
    make_proxy: ProxyFactory, replicas: list[Replica]
) -> None:
    slow, fast = replicas
    slow.delay = 0.4
    client = await make_proxy(fleet(slow, fast))
    resp = await client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert resp.status == 200
    assert "x-upstream-attempts" not in resp.headers
    assert len(slow.arrived) == 1 and fast.arrived == []


async def test_without_replicas_the_hedge_goes_to_the_next_upstream(
    make_proxy: ProxyFactory, replicas: list[Replica]
) -> None:
    slow, fast = replicas
    slow.delay = 2.0
    text = f"""
upstreams:
  - name: first
    url: {slow.url}
    hedge: {{after_ms: 100}}
  - name: second
    url: {fast.url}
"""
    client = await make_proxy(text)
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert (await resp.json())["choices"][0]["message"]["content"] == "from fast"
    assert resp.headers["x-upstream"] == "second"
    assert resp.headers["x-upstream-attempts"] == "2"


async def test_a_hedged_request_is_counted_once_by_rate_limits(
    make_proxy: ProxyFactory, replicas: list[Replica]
) -> None:
    slow, fast = replicas
    slow.delay = 2.0
    extra = """middleware:
  - type: rate_limit
    requests_per_minute: 10
"""
    client = await make_proxy(fleet(slow, fast, extra=extra))
    first = await client.post("/v1/chat/completions", json=chat_body())
    assert first.headers["x-upstream-attempts"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "9"
    # round robin: the next goes first to the fast one, unhedged
    second = await client.post("/v1/chat/completions", json=chat_body())
    assert second.headers["x-ratelimit-remaining-requests"] == "8"


async def test_when_both_fail_the_client_gets_one_error(
    make_proxy: ProxyFactory, replicas: list[Replica]
) -> None:
    slow, fast = replicas
    slow.delay, slow.status = 0.3, 500
    fast.delay, fast.status = 0.3, 500
    name = unique("hedged")
    client = await make_proxy(fleet(slow, fast, name=name))
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 502
    body = await resp.json()
    assert "Traceback" not in json.dumps(body) and body["error"]["message"]
    text = await (await client.get("/metrics")).text()
    assert metric(text, "chat_proxy_hedges_total", upstream=name, winner="neither") == 1
    assert metric(text, "chat_proxy_replica_errors_total", upstream=name, kind="http_500") == 2
