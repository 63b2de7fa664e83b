"""Faults: unreachable, slow, failing mid-stream, client gone; bad requests."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.fixtures import BASIC, DONE, Backend, ProxyFactory, chat_body, chunk, sse_handler


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_unreachable_backend_gives_502(make_proxy: ProxyFactory) -> None:
    text = f"upstreams:\n  - name: gone\n    url: http://127.0.0.1:{_dead_port()}/v1\n"
    client = await make_proxy(text)
    for stream in (False, True):
        resp = await client.post("/v1/chat/completions", json=chat_body(stream=stream))
        assert resp.status == 502
        assert resp.headers["Content-Type"].startswith("application/json")
        err = (await resp.json())["error"]
        assert err["type"] == "api_error"
        assert err["code"] == "upstream_unreachable"


async def test_no_first_byte_in_time_gives_504(make_proxy: ProxyFactory, backend: Backend) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3)
        return web.json_response({})

    backend.chat(slow)
    text = "upstreams:\n  - name: main\n    url: {backend}\n    timeouts: {first_byte: 0.2}\n"
    client = await make_proxy(text, backend)
    started = time.monotonic()
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 504
    assert time.monotonic() - started < 2
    err = (await resp.json())["error"]
    assert err["type"] == "api_error" and "0.2 seconds" in err["message"]


async def test_stream_headers_but_no_first_event_gives_504(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(3)
        return resp

    backend.chat(stall)
    text = "upstreams:\n  - name: main\n    url: {backend}\n    timeouts: {first_byte: 0.2}\n"
    client = await make_proxy(text, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status == 504


async def test_backend_fails_mid_stream(make_proxy: ProxyFactory, backend: Backend) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk("partial"))
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return resp

    backend.chat(broken)
    client = await make_proxy(BASIC, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status == 200
    body = await resp.read()  # a clean end: no exception reading to the end
    assert body.startswith(chunk("partial"))
    last = body[len(chunk("partial")) :]
    assert last.startswith(b"data: ") and last.endswith(b"\n\n")
    err = json.loads(last[6:])["error"]
    assert err["type"] == "api_error" and err["code"] == "upstream_reset"


async def test_backend_stalls_mid_stream_idle_timeout(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk("a"))
        await asyncio.sleep(3)
        return resp

    backend.chat(stall)
    text = "server: {keepalive_seconds: 0}\nupstreams:\n  - name: main\n    url: {backend}\n    timeouts: {idle: 0.3}\n"
    client = await make_proxy(text, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    body = await resp.read()
    assert body.startswith(chunk("a"))
    assert json.loads(body[len(chunk("a")) + 6 :])["error"]["code"] == "upstream_timeout"


async def test_client_disconnect_cancels_backend_request(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    gone = asyncio.Event()
    stamps: dict[str, float] = {}

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk("first"))
        try:
            await asyncio.sleep(30)  # the model is "thinking"; nothing is written
        except asyncio.CancelledError:
            stamps["gone"] = time.monotonic()
            gone.set()
            raise
        return resp

    backend.chat(endless)
    client = await make_proxy(BASIC, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert await resp.content.readuntil(b"\n\n") == chunk("first")
    resp.connection.transport.abort()  # type: ignore[union-attr]
    resp.close()
    stamps["closed"] = time.monotonic()
    await asyncio.wait_for(gone.wait(), 2)
    assert stamps["gone"] - stamps["closed"] < 1.0


@pytest.mark.parametrize(
    ("status", "body", "want_status", "want_type", "want_message"),
    [
        (401, b'{"error":"Unauthorized"}', 401, "authentication_error", "Unauthorized"),  # vLLM
        (
            404,
            b'{"error":"model \'x\' not found"}',
            404,
            "invalid_request_error",
            "model 'x' not found",
        ),  # Ollama
        (
            400,
            b'{"object":"error","message":"max_tokens is too large","type":"BadRequestError","param":null,"code":400}',
            400,
            "invalid_request_error",
            "max_tokens is too large",
        ),  # vLLM's older shape
        (400, b'{"detail":"bad field"}', 400, "invalid_request_error", "bad field"),  # FastAPI
        (500, b"Internal Server Error", 502, "api_error", "The backend failed (status 500)."),
        (
            503,
            b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}',
            503,
            "api_error",
            "Loading model",
        ),  # llama.cpp
        (
            429,
            b'{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}',
            429,
            "rate_limit_error",
            "slow down",
        ),
    ],
)
async def test_backend_errors_are_normalised(
    make_proxy: ProxyFactory,
    backend: Backend,
    status: int,
    body: bytes,
    want_status: int,
    want_type: str,
    want_message: str,
) -> None:
    async def fail(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, content_type="application/json")

    backend.chat(fail)
    client = await make_proxy(BASIC, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == want_status
    err = (await resp.json())["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == want_type
    assert err["message"] == want_message


async def test_llamacpp_error_field_in_stream_is_normalised(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    backend.chat(
        sse_handler(
            chunk("Hi"),
            b'error: {"code":500,"message":"context shift is disabled","type":"server_error"}\n\n',
        )
    )
    client = await make_proxy(BASIC, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    body = await resp.read()
    assert body.startswith(chunk("Hi"))
    tail = body[len(chunk("Hi")) :]
    assert tail.startswith(b"data: ")
    assert json.loads(tail[6:]) == {
        "error": {
            "message": "context shift is disabled",
            "type": "api_error",
            "param": None,
            "code": None,
        }
    }


async def test_vllm_string_error_in_stream_is_normalised(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    backend.chat(sse_handler(chunk("Hi"), b'data: {"error": "Unauthorized"}\n\n', DONE))
    client = await make_proxy(BASIC, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    body = await resp.read()
    events = [e for e in body.split(b"\n\n") if e]
    assert json.loads(events[1][6:])["error"]["message"] == "Unauthorized"
    assert json.loads(events[1][6:])["error"]["type"] == "api_error"
    assert events[2] == b"data: [DONE]"


async def test_body_over_limit_gets_413(make_proxy: ProxyFactory, backend: Backend) -> None:
    client = await make_proxy("server: {max_body_bytes: 1000}\n" + BASIC, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body("x" * 2000))
    assert resp.status == 413
    err = (await resp.json())["error"]
    assert err["code"] == "request_too_large" and err["type"] == "invalid_request_error"

    async def chunks() -> Any:
        for _ in range(5):
            yield b"x" * 400

    resp = await client.post("/v1/chat/completions", data=chunks())  # no Content-Length
    assert resp.status == 413
    assert backend.seen == []


@pytest.mark.parametrize(
    "data",
    [
        b"{not json",
        b"[1, 2]",
        b"",
        b"\xff\xfe\x00garbage",
        b"[" * 100000 + b"]" * 100000,
        b'"text"',
    ],
)
async def test_malformed_bodies_get_400(
    make_proxy: ProxyFactory, backend: Backend, data: bytes
) -> None:
    client = await make_proxy("server: {max_body_bytes: 1000000}\n" + BASIC, backend)
    resp = await client.post(
        "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "invalid_json"
    assert backend.seen == []


async def test_unknown_path_and_method(make_proxy: ProxyFactory, backend: Backend) -> None:
    client = await make_proxy(BASIC, backend)
    resp = await client.get("/nothing/here")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"
    resp = await client.get("/v1/chat/completions")
    assert resp.status == 405
    assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_fault_in_a_middleware_is_a_500_without_traceback(
    make_proxy: ProxyFactory, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    text = BASIC + "middleware:\n  - type: tests.plugins.broken:broken\n"
    client = await make_proxy(text, backend)
    with caplog.at_level(logging.ERROR):
        resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 500
    body = await resp.text()
    assert "Traceback" not in body and "ZeroDivisionError" not in body
    assert json.loads(body)["error"]["type"] == "api_error"
    assert any("unhandled error" in r.getMessage() for r in caplog.records)
    resp = await client.post("/v1/chat/completions", json=chat_body(), headers={"X-OK": "1"})
    assert resp.status == 200  # still serving


async def test_access_log_line(
    make_proxy: ProxyFactory, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_proxy(BASIC, backend)
    with caplog.at_level(logging.INFO, logger="chat_proxy.access"):
        resp = await client.post(
            "/v1/chat/completions",
            json=chat_body("a secret message"),
            headers={"X-Request-Id": "rid-1"},
        )
        await resp.read()
    [rec] = [r for r in caplog.records if r.name == "chat_proxy.access"]
    fields = rec.__dict__
    assert fields["request_id"] == "rid-1"
    assert fields["status"] == 200
    assert fields["model"] == "test-model"
    assert fields["stream"] is False
    assert fields["latency_ms"] >= 0 and fields["ttfb_ms"] >= 0
    from proxy.observability import JsonFormatter

    line = JsonFormatter().format(rec)
    assert "a secret message" not in line
    assert json.loads(line)["request_id"] == "rid-1"


async def test_user_middleware_runs_in_the_chain(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    text = BASIC + "middleware:\n  - type: tests.plugins.audit:audit\n    team: blue\n"
    client = await make_proxy(text, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 200
    assert resp.headers["X-Audited-By"] == "blue"
    assert backend.seen[-1].headers["X-Team"] == "blue"


_ = aiohttp
