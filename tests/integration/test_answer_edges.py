"""What a backend's answer may not do: grow the proxy without bound, slip an encoding
past the client, end a stream wrongly and pass for a whole one, or see headers meant
for the proxy."""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from typing import Any

import pytest
from aiohttp import web

from tests.fixtures import (
    BASIC,
    DONE,
    Backend,
    ProxyFactory,
    chat_body,
    chunk,
    completion,
    metric,
    sse_handler,
)
from tests.rawhttp import error, raw, request

TOOLS = """
middleware:
  - type: tool_keywords
    rules:
      - tool: end_call
        keywords: [goodbye]
"""

SESSION = """
middleware:
  - type: session
"""


def raw_handler(body: bytes, headers: dict[str, str], status: int = 200) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, status=status, headers=headers)

    return handler


# -- 5. memory is bounded by configuration --


async def test_an_answer_no_middleware_reads_streams_through(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    # a large download arrives at the client in pieces, before the backend is done
    sent: list[int] = []

    async def download(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = 8 * 1024 * 1024
        await resp.prepare(request)
        for i in range(8):
            await resp.write(bytes([i]) * (1024 * 1024))
            sent.append(i)
        await resp.write_eof()
        return resp

    backend.on("GET", "/v1/files/f1/content", download)
    client = await make_proxy(BASIC, backend)
    resp = await client.get("/v1/files/f1/content")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(8 * 1024 * 1024)
    first = await resp.content.readexactly(1024 * 1024)
    assert first == b"\x00" * (1024 * 1024)
    assert len(sent) < 8  # the client had its first MiB while the backend still wrote
    rest = await resp.read()
    assert len(rest) == 7 * 1024 * 1024
    assert rest[-1:] == b"\x07"


async def test_an_answer_a_middleware_must_parse_is_capped(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    big = completion("x" * 200_000)
    backend.chat(raw_handler(json.dumps(big).encode(), {"Content-Type": "application/json"}))
    client = await make_proxy("server:\n  max_response_bytes: 100000\n" + BASIC + TOOLS, backend)
    tools = [{"type": "function", "function": {"name": "end_call"}}]
    resp = await client.post("/v1/chat/completions", json=chat_body(tools=tools))
    assert resp.status == 502
    assert error(await resp.read())["code"] == "upstream_too_large"
    # under the cap it is read and parsed as usual
    backend.chat(
        raw_handler(
            json.dumps(completion("goodbye")).encode(), {"Content-Type": "application/json"}
        )
    )
    resp = await client.post("/v1/chat/completions", json=chat_body(tools=tools))
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["finish_reason"] == "tool_calls"


async def test_without_a_middleware_to_read_it_a_large_answer_passes(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    big = json.dumps(completion("x" * 200_000)).encode()
    backend.chat(raw_handler(big, {"Content-Type": "application/json"}))
    client = await make_proxy("server:\n  max_response_bytes: 100000\n" + BASIC, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 200
    assert await resp.read() == big


async def test_an_error_body_and_the_model_list_are_read_with_caps(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    huge = b'{"error": {"message": "' + b"e" * (3 * 1024 * 1024) + b'"}}'
    backend.chat(raw_handler(huge, {"Content-Type": "application/json"}, status=400))
    models = {
        "object": "list",
        "data": [{"id": f"m{i:06d}", "object": "model"} for i in range(5000)],
    }
    backend.on(
        "GET",
        "/v1/models",
        raw_handler(json.dumps(models).encode(), {"Content-Type": "application/json"}),
    )
    client = await make_proxy("server:\n  max_response_bytes: 100000\n" + BASIC, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body())
    body = await resp.read()
    assert resp.status == 400
    assert len(body) < 4096  # the 3 MiB message was never read, nor quoted
    error(body)
    resp = await client.get("/v1/models")
    assert resp.status == 502
    assert error(await resp.read())["code"] == "upstream_too_large"


# -- 7. Content-Encoding --


async def test_the_backend_is_asked_for_identity(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(BASIC, backend)
    resp = await client.post(
        "/v1/chat/completions", json=chat_body(), headers={"Accept-Encoding": "gzip, br"}
    )
    assert resp.status == 200
    assert backend.seen[-1].headers.getall("Accept-Encoding") == ["identity"]


async def test_an_encoded_answer_keeps_its_header(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    doc = {"object": "list", "data": [{"embedding": [0.1, 0.2]}]}
    packed = gzip.compress(json.dumps(doc).encode())
    backend.on(
        "POST",
        "/v1/embeddings",
        raw_handler(packed, {"Content-Type": "application/json", "Content-Encoding": "gzip"}),
    )
    client = await make_proxy(BASIC, backend)
    port = client.server.port
    assert port is not None
    status, headers, body = await raw(
        port, request("POST", "/v1/embeddings", json.dumps({"model": "m", "input": "x"}).encode())
    )
    assert status == 200
    assert headers["content-encoding"] == "gzip"
    assert body == packed
    assert json.loads(gzip.decompress(body)) == doc


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_an_encoded_answer_is_decoded_where_a_middleware_reads_it(
    make_proxy: ProxyFactory, backend: Backend, encoding: str
) -> None:
    plain = json.dumps(completion("OK, goodbye!")).encode()
    packed = gzip.compress(plain) if encoding == "gzip" else zlib.compress(plain)
    backend.chat(
        raw_handler(packed, {"Content-Type": "application/json", "Content-Encoding": encoding})
    )
    client = await make_proxy(BASIC + TOOLS, backend)
    port = client.server.port
    assert port is not None
    tools = [{"type": "function", "function": {"name": "end_call"}}]
    status, headers, body = await raw(
        port, request("POST", "/v1/chat/completions", json.dumps(chat_body(tools=tools)).encode())
    )
    assert status == 200
    assert "content-encoding" not in headers  # re-encoded by the proxy, as plain JSON
    choice = json.loads(body)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "OK, goodbye!"


async def test_an_encoded_stream_is_decoded(make_proxy: ProxyFactory, backend: Backend) -> None:
    plain = chunk("Hello") + chunk(" there", finish="stop") + DONE
    backend.chat(
        raw_handler(
            gzip.compress(plain),
            {"Content-Type": "text/event-stream", "Content-Encoding": "gzip"},
        )
    )
    client = await make_proxy(BASIC, backend)
    port = client.server.port
    assert port is not None
    status, headers, body = await raw(
        port,
        request("POST", "/v1/chat/completions", json.dumps(chat_body(stream=True)).encode()),
    )
    assert status == 200
    assert "content-encoding" not in headers
    assert body == plain


async def test_an_encoding_the_proxy_cannot_read_is_a_502_where_it_must(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    backend.chat(
        raw_handler(
            b"\x8b\x00 not brotli", {"Content-Type": "application/json", "Content-Encoding": "br"}
        )
    )
    client = await make_proxy(BASIC + TOOLS, backend)
    tools = [{"type": "function", "function": {"name": "end_call"}}]
    resp = await client.post("/v1/chat/completions", json=chat_body(tools=tools))
    assert resp.status == 502
    assert error(await resp.read())["code"] == "upstream_bad_response"


# -- 9. hop-by-hop and X-Forwarded-* --


async def test_hop_by_hop_headers_stay_and_forwarded_ones_are_added(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(BASIC, backend)
    port = client.server.port
    assert port is not None
    data = request(
        "POST",
        "/v1/chat/completions",
        json.dumps(chat_body()).encode(),
        extra=(
            "Connection: close, X-Internal-Token, x-debug",
            "X-Internal-Token: secret-1",
            "X-Debug: on",
            "Proxy-Connection: keep-alive",
            "X-Forwarded-For: 203.0.113.7",
            "X-Forwarded-Proto: https",
            "X-Kept: yes",
        ),
    )
    status, _, _ = await raw(port, data)
    assert status == 200
    seen = backend.seen[-1].headers
    assert "X-Internal-Token" not in seen
    assert "X-Debug" not in seen
    assert "Proxy-Connection" not in seen
    assert seen["X-Kept"] == "yes"
    assert seen.getall("X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    # the client is not a trusted balancer: the scheme is the one the proxy saw
    assert seen.getall("X-Forwarded-Proto") == ["http"]
    assert seen.getall("X-Forwarded-Host") == ["127.0.0.1"]


async def test_a_trusted_balancers_proto_and_host_go_on(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy('server:\n  trusted_proxies: ["127.0.0.1"]\n' + BASIC, backend)
    port = client.server.port
    assert port is not None
    data = request(
        "POST",
        "/v1/chat/completions",
        json.dumps(chat_body()).encode(),
        extra=(
            "X-Forwarded-For: 198.51.100.4",
            "X-Forwarded-Proto: https",
            "X-Forwarded-Host: api.example.com",
        ),
    )
    status, _, _ = await raw(port, data)
    assert status == 200
    seen = backend.seen[-1].headers
    assert seen["X-Forwarded-For"] == "198.51.100.4, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "https"
    assert seen["X-Forwarded-Host"] == "api.example.com"


# -- 10. a stream that ends wrongly is a failure --


async def test_a_stream_of_comments_only_is_a_502(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    backend.chat(sse_handler(b": ping\n\n", b": ping\n\n"))
    client = await make_proxy(BASIC, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status == 502
    assert resp.headers["Content-Type"].startswith("application/json")
    assert error(await resp.read())["code"] == "upstream_empty"


async def test_a_stream_of_comments_only_falls_back(make_proxy: ProxyFactory) -> None:
    empty = Backend()
    full = Backend()
    servers = []
    for b, handler in (
        (empty, sse_handler(b": ping\n\n")),
        (full, sse_handler(chunk("from b", finish="stop"), DONE)),
    ):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", b._dispatch)
        from aiohttp.test_utils import TestServer

        b.server = TestServer(app)
        await b.server.start_server()
        b.chat(handler)
        servers.append(b.server)
    try:
        text = f"""
upstreams:
  - name: a
    url: {empty.url}
  - name: b
    url: {full.url}
"""
        client = await make_proxy(text)
        resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
        assert resp.status == 200
        assert resp.headers["x-upstream"] == "b"
        assert await resp.read() == chunk("from b", finish="stop") + DONE
    finally:
        for server in servers:
            await server.close()


async def test_comments_before_the_first_event_go_on_byte_for_byte(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    parts = (b": ping\n\n", chunk("Hi", finish="stop"), DONE)
    backend.chat(sse_handler(*parts))
    client = await make_proxy(BASIC, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status == 200
    assert await resp.read() == b"".join(parts)


@pytest.mark.parametrize("chain", ["", TOOLS, SESSION])
async def test_a_stream_cut_short_ends_with_an_error(
    make_proxy: ProxyFactory, backend: Backend, chain: str, caplog: pytest.LogCaptureFixture
) -> None:
    # what llama.cpp's server does when it runs out of KV slots
    parts = (chunk("Once"), chunk(" upon"), chunk(" a"))
    backend.chat(sse_handler(*parts))
    client = await make_proxy(BASIC + chain, backend)
    before = metric(
        await (await client.get("/metrics")).text(),
        "chat_proxy_upstream_errors_total",
        kind="truncated",
    )
    with caplog.at_level(logging.INFO, logger="chat_proxy.access"):
        resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
        body = await resp.read()
    assert resp.status == 200
    assert body.startswith(b"".join(parts))
    last = body[len(b"".join(parts)) :]
    assert last.startswith(b"data: ") and last.endswith(b"\n\n")
    assert error(last[6:].strip())["code"] == "upstream_truncated"
    [line] = [r for r in caplog.records if r.name == "chat_proxy.access"]
    assert line.__dict__["error"] == "upstream_truncated"
    after = metric(
        await (await client.get("/metrics")).text(),
        "chat_proxy_upstream_errors_total",
        kind="truncated",
    )
    assert after == before + 1


@pytest.mark.parametrize("chain", ["", TOOLS])
@pytest.mark.parametrize(
    "parts",
    [
        (chunk("Hi"), chunk(" there", finish="stop")),  # a finish_reason, no [DONE]
        (chunk("Hi"), chunk(None, finish="length"), DONE),
        (chunk("Hi"), DONE),  # [DONE] alone says the backend finished
    ],
)
async def test_a_stream_that_ended_has_nothing_added(
    make_proxy: ProxyFactory, backend: Backend, chain: str, parts: tuple[bytes, ...]
) -> None:
    backend.chat(sse_handler(*parts))
    client = await make_proxy(BASIC + chain, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    body = await resp.read()
    assert b"upstream_truncated" not in body
    if not chain:
        assert body == b"".join(parts)


async def test_each_choice_needs_its_finish_reason(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    parts = (chunk("a", index=0), chunk("b", index=1), chunk(None, index=0, finish="stop"))
    backend.chat(sse_handler(*parts))
    client = await make_proxy(BASIC, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True, n=2))
    assert b"upstream_truncated" in await resp.read()
    backend.chat(sse_handler(*parts, chunk(None, index=1, finish="stop")))
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True, n=2))
    assert b"upstream_truncated" not in await resp.read()
