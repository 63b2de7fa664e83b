"""An upstream with `client: aiohttp`: the proxy relays through aiohttp's client as
through its own, byte for byte."""

from __future__ import annotations

from aiohttp import web

from tests.fixtures import BASIC, DONE, Backend, ProxyFactory, chat_body, chunk, sse_handler

AIOHTTP = BASIC + "    client: aiohttp\n    idle_seconds: 5\n"


async def test_a_chat_completion_is_the_backends_bytes(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    raw = b'{"id":"x","object":"chat.completion","choices":[],"weird":  1.50}'

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=raw, content_type="application/json")

    backend.chat(handler)
    client = await make_proxy(AIOHTTP, backend)
    for _ in range(2):  # the second on the kept-alive connection
        resp = await client.post("/v1/chat/completions", json=chat_body())
        assert resp.status == 200
        assert await resp.read() == raw
    assert backend.seen[0].json() == chat_body()
    # the same request through the proxy's own client: the backend sees the same
    # headers (aiohttp adds no Accept, Accept-Encoding, User-Agent or Content-Type)
    own = await make_proxy(BASIC, backend)
    resp = await own.post("/v1/chat/completions", json=chat_body())
    assert await resp.read() == raw

    first, other = backend.seen[0].headers, backend.seen[2].headers
    assert list(first.keys()) == list(other.keys())
    for name in ("Accept", "Accept-Encoding", "User-Agent", "Content-Type", "Content-Length"):
        assert first.getall(name, []) == other.getall(name, [])


async def test_a_stream_is_relayed_byte_for_byte(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    parts = [chunk("Hel"), chunk("lo"), b": a comment\n\n", chunk(finish="stop"), DONE]
    backend.chat(sse_handler(*parts, delay=0.01))
    client = await make_proxy(AIOHTTP, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert await resp.read() == b"".join(parts)
