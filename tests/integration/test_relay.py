"""The relay: byte-exact pass-through, streaming as it arrives, and the basics."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from tests.fixtures import (
    BASIC,
    DONE,
    Backend,
    ProxyFactory,
    chat_body,
    chunk,
    sse_handler,
    usage_chunk,
)


async def test_non_streaming_body_is_the_backends(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    raw = b'{"id":"x","object":"chat.completion","choices":[],"weird":  1.50}'

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=raw, content_type="application/json")

    backend.chat(handler)
    client = await make_proxy(BASIC, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 200
    assert await resp.read() == raw
    assert resp.headers["X-Request-Id"].startswith("req_")


async def test_stream_is_relayed_byte_for_byte(make_proxy: ProxyFactory, backend: Backend) -> None:
    parts = [
        chunk("", role="assistant"),
        b": a comment\r\n\r\n",
        chunk("Hel")[:30],
        chunk("Hel")[30:] + chunk("lo \xc3\xa9".encode("latin-1").decode("utf-8")),
        b"event: odd\ndata: x\ndata: y\r\r",
        chunk(None, finish="stop"),
        usage_chunk(),
        DONE,
    ]
    backend.chat(sse_handler(*parts))
    client = await make_proxy(BASIC, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    assert await resp.read() == b"".join(parts)


async def test_first_event_arrives_while_backend_still_sending(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk("first"))
        await asyncio.wait_for(release.wait(), 5)
        await resp.write(chunk("second") + DONE)
        await resp.write_eof()
        return resp

    backend.chat(handler)
    client = await make_proxy(BASIC, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    got = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 2)
    assert got == chunk("first")
    assert not release.is_set()
    release.set()
    assert await resp.read() == chunk("second") + DONE


async def test_request_id_kept_and_forwarded(make_proxy: ProxyFactory, backend: Backend) -> None:
    client = await make_proxy(BASIC, backend)
    resp = await client.post(
        "/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": "abc-123"}
    )
    assert resp.headers["X-Request-Id"] == "abc-123"
    assert backend.seen[-1].headers["X-Request-Id"] == "abc-123"


async def test_bare_chat_path_and_passthrough(make_proxy: ProxyFactory, backend: Backend) -> None:
    async def embed(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return web.json_response(
            {"object": "list", "data": [{"embedding": [1, 2]}], "model": body["model"]}
        )

    backend.on("POST", "/v1/embeddings", embed)
    client = await make_proxy(BASIC, backend)
    resp = await client.post("/chat/completions", json=chat_body())
    assert resp.status == 200
    assert backend.seen[-1].path == "/v1/chat/completions"
    resp = await client.post("/v1/embeddings", json={"model": "e", "input": "x"})
    assert resp.status == 200
    assert (await resp.json())["model"] == "e"
    resp = await client.get("/v1/models")
    assert (await resp.json())["data"][0]["id"] == "test-model"


async def test_routing_by_model_glob(
    make_proxy: ProxyFactory, backend: Backend, aiohttp_server: Any
) -> None:
    other_seen: list[str] = []

    async def other(request: web.Request) -> web.StreamResponse:
        other_seen.append((await request.json())["model"])
        return web.json_response({"choices": [], "from": "other"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", other)
    server = await aiohttp_server(app)
    text = f"""
upstreams:
  - name: gpt
    url: {server.make_url("/v1")}
    models: ["gpt-*"]
  - name: rest
    url: {{backend}}
"""
    client = await make_proxy(text, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(model="gpt-4o"))
    assert (await resp.json())["from"] == "other"
    assert resp.headers["x-upstream"] == "gpt"
    resp = await client.post("/v1/chat/completions", json=chat_body(model="llama3"))
    assert resp.headers["x-upstream"] == "rest"
    assert other_seen == ["gpt-4o"]


async def test_no_upstream_for_model(make_proxy: ProxyFactory, backend: Backend) -> None:
    text = BASIC + '    models: ["llama*"]\n'
    client = await make_proxy(text, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(model="gpt-4o"))
    assert resp.status == 404
    body = await resp.json()
    assert body["error"]["code"] == "model_not_found"
    assert body["error"]["param"] == "model"


async def test_keepalive_comment_while_backend_silent(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk("a"))
        await asyncio.sleep(0.35)
        await resp.write(chunk("b") + DONE)
        await resp.write_eof()
        return resp

    backend.chat(handler)
    text = "server: {keepalive_seconds: 0.1}\n" + BASIC
    client = await make_proxy(text, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    body = await resp.read()
    assert body.startswith(chunk("a") + b": keepalive\n\n")
    assert body.endswith(chunk("b") + DONE)
    assert body.count(b": keepalive\n\n") >= 2


async def test_healthz_and_readyz(make_proxy: ProxyFactory, backend: Backend) -> None:
    client = await make_proxy(BASIC, backend)
    resp = await client.get("/healthz")
    assert resp.status == 200 and await resp.json() == {"status": "ok"}
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["upstreams"] == {"main": "ok"}


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_elevenlabs_fields_never_reach_the_backend(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(BASIC, backend)  # no validate middleware in the chain
    body = chat_body(elevenlabs_extra_body={"conversation_id": "c1"}, user_id="u-42")
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    sent = backend.seen[-1].json()
    assert "elevenlabs_extra_body" not in sent and "user_id" not in sent
    assert sent["user"] == "u-42"


async def test_readyz_probes_the_backend(make_proxy: ProxyFactory, backend: Backend) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    text = BASIC + f"  - name: gone\n    url: http://127.0.0.1:{dead}/v1\n"
    client = await make_proxy(text, backend)
    resp = await client.get("/readyz")
    assert resp.status == 200  # one upstream is enough
    assert (await resp.json())["upstreams"] == {"main": "ok", "gone": "unreachable"}
    only_dead = f"upstreams:\n  - name: gone\n    url: http://127.0.0.1:{dead}/v1\n"
    client = await make_proxy(only_dead)
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["status"] == "unavailable"
