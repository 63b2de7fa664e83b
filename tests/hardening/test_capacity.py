"""The proxy's own limits, seen by a client: a backend pool with every connection in
use, the client connections one process takes (`server.max_connections`, by default
what its open-file limit allows), and the open-file limit itself reached. Each gives
a 503 in the OpenAI shape that names the limit, a metric and a log line; none is a
hang, and the proxy serves again once the limit is no longer reached.

Real `chat-proxy serve` processes (and, for the open-file limit, the proxy served
from a thread of this process, whose descriptors the test takes up), in front of a
stand-in backend that holds a stream open until told to end it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from proxy.capacity import MARGIN, MINIMUM, client_connections
from proxy.loader import load_text
from tests.fixtures import chunk
from tests.hardening.fixtures import (
    ProxyProcess,
    ThreadedProxy,
    assert_openai_error,
    build_request,
    chat,
    metric,
    raw_request,
    request,
)
from tests.hardening.test_client_limits import StreamingBackend, read_to_close

CHAT = "/v1/chat/completions"


class HoldingBackend(StreamingBackend):
    """A stream whose last message is "hold" sends one event, then waits (at most
    `limit` seconds) until `release()`; others are answered at once."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.released = False

    def release(self) -> None:
        self.released = True

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body["messages"][-1]["content"] != "hold":
            return await super()._chat(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk("held"))
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):
            # released from the test's thread: polled
            while not self.released and time.monotonic() - started < self.limit:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
def holding() -> Iterator[HoldingBackend]:
    b = HoldingBackend(limit=15.0)
    b.start()
    yield b
    b.release()
    b.stop()


def hold_stream(port: int) -> socket.socket:
    """A stream request on a raw socket whose first event has arrived: it holds a
    connection to the backend until the backend is released."""
    body = json.dumps(chat("hold", stream=True)).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(build_request("POST", CHAT, body, key=None).replace(b"Connection: close", b"X: y"))
    data = b""
    while b"held" not in data:
        part = s.recv(65536)
        assert part, data
        data += part
    assert data.startswith(b"HTTP/1.1 200"), data[:300]
    return s


def read_to_done(sock: socket.socket) -> bytes:
    data = b""
    while b"[DONE]" not in data:
        part = sock.recv(65536)
        assert part, data
        data += part
    return data


def metrics_text(port: int) -> str:
    return request(port, "GET", "/metrics", key=None).body.decode()


# -- a full backend pool --


@pytest.mark.parametrize("client", ["http1", "aiohttp"])
def test_a_full_pool_gives_a_503_that_names_it_after_the_pool_wait(
    client: str, holding: HoldingBackend, proxy_process: Any
) -> None:
    proxy: ProxyProcess = proxy_process(
        f"""
upstreams:
  - name: main
    url: "{holding.url}"
    client: {client}
    max_connections: 1
    timeouts: {{connect: 2, pool: 0.5, first_byte: 30, idle: 30}}
"""
    )
    held = hold_stream(proxy.port)
    try:
        started = time.monotonic()
        reply = request(proxy.port, "POST", CHAT, chat("anyone there?"), key=None)
        waited = time.monotonic() - started
        assert reply.status == 503, reply.body[:500]
        err = assert_openai_error(reply.body, 503)
        assert err["code"] == "upstream_pool_full"
        assert "All 1 connections to the backend are in use" in err["message"]
        assert "max_connections" in err["message"]
        assert reply.headers["Retry-After"] == "1"
        assert reply.headers["retry-after-ms"] == "1000"
        # the pool's wait, not the first_byte timeout of 30 s
        assert 0.45 <= waited < 10, waited
        text = metrics_text(proxy.port)
        assert (
            metric(text, "chat_proxy_upstream_errors_total", upstream="main", kind="pool_full") == 1
        )
        assert "every connection of the upstream's pool is in use" in proxy.log_text()
    finally:
        holding.release()
        assert b"data: [DONE]" in read_to_done(held)
        held.close()
    # a place is free again: served
    reply = request(proxy.port, "POST", CHAT, chat("now?"), key=None)
    assert reply.status == 200, reply.body[:500]
    assert reply.json()["choices"][0]["message"]["content"] == "You said: now?"
    # and the replica's circuit did not count the proxy's own limit against it
    ready = request(proxy.port, "GET", "/readyz", key=None)
    assert ready.status == 200, ready.body[:500]


def test_a_full_pool_sends_the_request_to_the_fallback_upstream(
    holding: HoldingBackend, proxy_process: Any
) -> None:
    proxy: ProxyProcess = proxy_process(
        f"""
upstreams:
  - name: main
    url: "{holding.url}"
    max_connections: 1
    timeouts: {{connect: 2, pool: 0.3, first_byte: 30, idle: 30}}
  - name: spare
    url: "{holding.url}"
"""
    )
    held = hold_stream(proxy.port)
    try:
        reply = request(proxy.port, "POST", CHAT, chat("elsewhere"), key=None)
        assert reply.status == 200, reply.body[:500]
        assert reply.headers["x-upstream"] == "spare"
        assert reply.json()["choices"][0]["message"]["content"] == "You said: elsewhere"
    finally:
        holding.release()
        held.close()


# -- the client connections one process takes --


def open_kept_alive(port: int) -> socket.socket:
    """A connection that has had one answer and stays open."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while not data.endswith(b"}") and b"\r\n\r\n" not in data:
        data += s.recv(65536)
    assert data.startswith(b"HTTP/1.1 200"), data[:300]
    return s


def test_a_connection_beyond_max_connections_gets_a_503_and_is_closed(
    holding: HoldingBackend, proxy_process: Any
) -> None:
    proxy: ProxyProcess = proxy_process(
        f"""
server:
  max_connections: 2
upstreams:
  - name: main
    url: "{holding.url}"
"""
    )
    deadline = time.monotonic() + 5
    while "chat-proxy listening" not in proxy.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    listening = [json.loads(line) for line in proxy.log_lines() if "chat-proxy listening" in line]
    assert listening and listening[0]["max_connections"] == 2
    first = open_kept_alive(proxy.port)
    second = hold_stream(proxy.port)
    try:
        third = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        third.sendall(build_request("POST", CHAT, json.dumps(chat("me too")).encode(), key=None))
        data = read_to_close(third, 10)
        third.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), data[:300]
        assert b"\r\nConnection: close" in head
        assert b"\r\nRetry-After: 1" in head
        err = assert_openai_error(body, 503)
        assert err["code"] == "too_many_connections"
        assert "(2," in err["message"]
        # counted, and logged once
        first.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        text = read_to_close(first, 10).partition(b"\r\n\r\n")[2].decode()
        assert metric(text, "chat_proxy_connections_refused_total", reason="max_connections") == 1
        assert "client connections refused" in proxy.log_text()
    finally:
        first.close()
        holding.release()
        second.close()
    # the connections closed: served again
    deadline = time.monotonic() + 5
    while True:
        reply = request(proxy.port, "POST", CHAT, chat("room now?"), key=None)
        if reply.status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert reply.status == 200, reply.body[:500]


def test_the_default_is_what_the_open_file_limit_leaves() -> None:
    config = load_text(
        """
upstreams:
  - name: a
    url: http://127.0.0.1:1/v1
    max_connections: 100
  - name: fleet
    replicas: [http://127.0.0.1:2/v1, http://127.0.0.1:3/v1]
    max_connections: 50
""",
        env={},
    )
    assert client_connections(config, 1024) == 1024 - MARGIN - 200
    assert client_connections(config, 100) == MINIMUM
    explicit = load_text(
        "server: {max_connections: 5000}\nupstreams: [{name: a, url: 'http://127.0.0.1:1/v1'}]",
        env={},
    )
    assert client_connections(explicit, 1024) == 5000


# -- the open-file limit reached --


@contextlib.contextmanager
def no_descriptor_left() -> Iterator[None]:
    """This process's soft open-file limit lowered so that no descriptor is left (the
    lower numbers filled with /dev/null), then put back."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
    try:
        while True:
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_no_descriptor_for_the_backend_gives_a_503_that_names_the_limit() -> None:
    with socket.socket() as backend:
        backend.bind(("127.0.0.1", 0))
        backend.listen()
        port = backend.getsockname()[1]
        proxy = ThreadedProxy(
            f"""
upstreams:
  - name: main
    url: http://127.0.0.1:{port}/v1
    timeouts: {{connect: 2, first_byte: 1}}
"""
        ).start()
        try:
            client = open_kept_alive(proxy.port)  # accepted: its descriptor taken
            body = json.dumps(chat("hello")).encode()
            with no_descriptor_left():
                client.sendall(build_request("POST", CHAT, body, key=None))
                data = read_to_close(client, 10)
            client.close()
            head, _, payload = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 "), data[:300]
            err = assert_openai_error(payload, 503)
            assert err["code"] == "open_file_limit"
            assert "open-file limit" in err["message"]
            # descriptors back: the backend is reached (and answers nothing: a timeout)
            reply = raw_request(
                proxy.port,
                build_request("POST", CHAT, body, key=None),
            )
            assert reply.status == 504, reply.body[:300]
        finally:
            proxy.stop()
