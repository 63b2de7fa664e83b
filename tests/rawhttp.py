"""A raw HTTP/1.1 client for the tests: bytes sent as they are, one answer read."""

from __future__ import annotations

import asyncio
import json
from typing import Any


async def read_answer(
    reader: asyncio.StreamReader, timeout: float = 10
) -> tuple[int, dict[str, str], bytes]:
    """One answer: status, headers (lower-case names) and the body, de-chunked."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = b""
    if "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout)
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await asyncio.wait_for(reader.readline(), timeout)).strip(), 16)
            data = await asyncio.wait_for(reader.readexactly(size + 2), timeout)
            if size == 0:
                break
            body += data[:-2]
    return status, headers, body


async def raw(
    port: int, data: bytes, *, read_timeout: float = 10
) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are on a fresh connection; read one whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_answer(reader, read_timeout)
    finally:
        writer.close()


def request(
    method: str,
    target: str,
    body: bytes = b"",
    *,
    ctype: str | None = "application/json",
    key: str | None = None,
    extra: tuple[str, ...] = (),
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    if ctype is not None:
        lines.append(f"Content-Type: {ctype}")
    lines.extend(extra)
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def error(body: bytes) -> dict[str, Any]:
    """The inner object of an OpenAI-shape error body, checked for its four fields."""
    doc = json.loads(body)
    assert set(doc) == {"error"}, doc
    err: dict[str, Any] = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err
