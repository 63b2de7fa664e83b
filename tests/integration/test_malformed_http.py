"""A request the HTTP parser refuses gets the OpenAI error shape, like every other
error, and never its own bytes back (they may hold a key)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.fixtures import BASIC, Backend, ProxyFactory

SECRET = "sk-live-0123456789abcdef"


async def exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        raw = await asyncio.wait_for(reader.read(), 5)  # the connection is closed after
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize(
    "data",
    [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Api-Key: "
        + SECRET.encode()
        + b"\x01\r\nContent-Length: 2\r\n\r\n{}",
        b"GARBAGE " + SECRET.encode() + b"\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
        + SECRET.encode()
        + b"\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Long: " + SECRET.encode() * 1000 + b"\r\n\r\n",
    ],
    ids=["control-character", "request-line", "content-length", "header-too-long"],
)
async def test_malformed_requests_get_a_json_error_without_their_bytes(
    make_proxy: ProxyFactory, backend: Backend, data: bytes
) -> None:
    client = await make_proxy(BASIC, backend)
    assert client.port is not None
    status, headers, body = await exchange(client.port, data)
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    doc: Any = json.loads(body)
    assert doc["error"]["type"] == "invalid_request_error"
    assert doc["error"]["code"] == "invalid_http"
    assert doc["error"]["message"].startswith("The request is not valid HTTP")
    assert SECRET.encode() not in body and b"sk-live" not in body
    # and the proxy goes on serving
    ok = await client.get("/healthz")
    assert ok.status == 200
