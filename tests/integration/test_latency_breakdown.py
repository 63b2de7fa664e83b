"""Where a turn's time went, as its session records it and the metrics show it: the
wait for admission, the backend's first byte, its first content token (what a caller
hears), the whole turn."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from tests.fixtures import DONE, Backend, ProxyFactory, chat_body, chunk, metric

SESSIONS = """
upstreams:
  - name: main
    url: {backend}
middleware:
  - type: session
"""


def slow_first_token(delay: float) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk(role="assistant"))  # the first byte at once, no text
        await asyncio.sleep(delay)
        await resp.write(chunk("Hello") + chunk(None, finish="stop") + DONE)
        await resp.write_eof()
        return resp

    return handler


async def test_a_turn_records_its_first_byte_and_its_first_token_apart(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    backend.chat(slow_first_token(0.3))
    client = await make_proxy(SESSIONS, backend)
    before = metric(
        await (await client.get("/metrics")).text(),
        "chat_proxy_time_to_first_token_seconds_count",
        route="chat",
    )
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    await resp.read()
    sid = resp.headers["X-Session-Id"]
    for _ in range(50):
        session = await (await client.get(f"/v1/sessions/{sid}")).json()
        if session.get("turns"):
            break
        await asyncio.sleep(0.05)
    timing = session["turns"][0]["timing"]
    assert timing["ttfb_ms"] < 200
    assert 300 <= timing["first_token_ms"] < 1500
    assert timing["total_ms"] >= timing["first_token_ms"]
    assert timing["queue_ms"] is None  # no admission on this upstream
    text = await (await client.get("/metrics")).text()
    after = metric(text, "chat_proxy_time_to_first_token_seconds_count", route="chat")
    assert after == before + 1
    # the 0.25 s bucket does not hold it: the first token came after 0.3 s
    assert (
        metric(text, "chat_proxy_time_to_first_token_seconds_bucket", route="chat", le="0.25")
        < after
    )


async def test_a_raw_stream_with_no_middleware_is_timed_too(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    backend.chat(slow_first_token(0.3))
    client = await make_proxy("upstreams:\n  - name: main\n    url: {backend}\n", backend)
    text = await (await client.get("/metrics")).text()
    fast = metric(text, "chat_proxy_time_to_first_token_seconds_bucket", route="chat", le="0.25")
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    await resp.read()
    text = await (await client.get("/metrics")).text()
    assert (
        metric(text, "chat_proxy_time_to_first_token_seconds_bucket", route="chat", le="0.25")
        == fast
    )
    assert metric(text, "chat_proxy_time_to_first_token_seconds_bucket", route="chat", le="2.5") > 0
