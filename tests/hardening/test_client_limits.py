"""Clients cannot hold the proxy: `server.timeouts` seen from a client's socket.

A real `chat-proxy serve` process with header, body, keepalive and send of one second,
in front of a stand-in backend (in a thread of its own) that can stream forever and
records when the proxy closes its request."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import build_app
from proxy.inbound import ClientConnection, LimitedRunner
from proxy.loader import load_text
from tests.fixtures import DONE, chunk, completion
from tests.hardening.fixtures import ProxyProcess, assert_openai_error, free_port

HEADER = BODY = KEEPALIVE = SEND = 1.0
POOL = 10  # the backend pool of the proxy under test
SLACK = 1.5  # scheduling slack on a loaded machine

CHAT = b"/v1/chat/completions"


# -- a stand-in backend that can stream forever --


@dataclass
class Stream:
    started: float
    ended: float | None = None
    gone: bool = False  # ended because the proxy closed the request


@dataclass
class StreamingBackend:
    """An OpenAI-compatible stand-in served from a thread: a request whose last message
    starts with "forever" gets SSE events as fast as they are taken, for at most
    `limit` seconds; others get a short answer."""

    limit: float = 20.0
    streams: dict[str, Stream] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0
    peak: int = 0  # the most streams open at once

    def __post_init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def open_streams(self) -> int:
        with self.lock:
            return sum(1 for s in self.streams.values() if s.ended is None)

    def stream(self, tag: str) -> Stream | None:
        with self.lock:
            return self.streams.get(tag)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        text = body["messages"][-1]["content"]
        if not body.get("stream"):
            return web.json_response(completion(f"You said: {text}"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if not text.startswith("forever"):
            await resp.write(chunk(f"You said: {text}") + DONE)
            await resp.write_eof()
            return resp
        record = Stream(started=time.monotonic())
        with self.lock:
            self.streams[text] = record
            self.peak = max(self.peak, sum(1 for s in self.streams.values() if s.ended is None))
        event = chunk("x" * 1000)
        try:
            while time.monotonic() - record.started < self.limit:
                await resp.write(event)
                await asyncio.sleep(0)
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            record.gone = True
        finally:
            record.ended = time.monotonic()
        return resp

    def start(self) -> StreamingBackend:
        self.thread.start()

        async def up() -> int:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._chat)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            port: int = self.runner.addresses[0][1]
            return port

        self.port = asyncio.run_coroutine_threadsafe(up(), self.loop).result(10)
        return self

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def backend_thread() -> Iterator[StreamingBackend]:
    b = StreamingBackend().start()
    yield b
    b.stop()


def _serve(tmp: Path, backend: StreamingBackend, event_loop: str) -> ProxyProcess:
    cfg = tmp / f"proxy-{event_loop}.yaml"
    cfg.write_text(
        f"""
server:
  event_loop: {event_loop}
  timeouts: {{header: {HEADER}, body: {BODY}, keepalive: {KEEPALIVE}, send: {SEND}}}
upstreams:
  - name: main
    url: "{backend.url}"
    timeouts: {{connect: 2, first_byte: 30, idle: 30}}
    max_connections: {POOL}
"""
    )
    return ProxyProcess(cfg, free_port(), tmp / f"proxy-{event_loop}.log").start()


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, backend_thread: StreamingBackend
) -> Iterator[int]:
    """`chat-proxy serve` with one-second client timeouts (on uvloop where it is
    installed, as deployed); yields its port."""
    p = _serve(tmp_path_factory.mktemp("client-limits"), backend_thread, "auto")
    yield p.port
    p.kill()


@pytest.fixture(scope="module")
def asyncio_proxy(
    tmp_path_factory: pytest.TempPathFactory, backend_thread: StreamingBackend
) -> Iterator[int]:
    """The same on the standard library's event loop."""
    p = _serve(tmp_path_factory.mktemp("client-limits"), backend_thread, "asyncio")
    yield p.port
    p.kill()


# -- a client on a raw socket --


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def read_to_close(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the proxy sends until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            part = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not part:
            return data
        data += part


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def parse(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return Answer(status, headers, body)


def assert_408(raw: bytes) -> None:
    answer = parse(raw)
    assert answer.status == 408, raw[:500]
    assert answer.headers.get("connection") == "close", answer.headers
    assert answer.headers.get("content-type", "").startswith("application/json")
    err = assert_openai_error(answer.body, 408)
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "request_timeout"
    assert err["param"] is None


def chat_request(text: str, stream: bool = False, connection: str = "close") -> bytes:
    body = json.dumps(
        {"model": "test-model", "messages": [{"role": "user", "content": text}], "stream": stream}
    ).encode()
    return (
        b"POST " + CHAT + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"Connection: " + connection.encode() + b"\r\n\r\n" + body
    )


def assert_serves(port: int, text: str = "still there?", timeout: float = 10) -> None:
    """A normal chat request, streamed, gets its whole answer."""
    with connect(port) as sock:
        sock.sendall(chat_request(text, stream=True))
        raw = read_to_close(sock, timeout)
    answer = parse(raw)
    assert answer.status == 200, raw[:500]
    assert f"You said: {text}".encode() in raw
    assert DONE in raw and raw.endswith(b"0\r\n\r\n"), raw[-200:]  # the chunked end


def wait_for(check: Any, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step)
    return bool(check())


# -- the request head --


def check_half_head(port: int) -> None:
    with connect(port) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        raw = read_to_close(sock)
        elapsed = time.monotonic() - started
    assert_408(raw)
    assert HEADER - 0.2 <= elapsed <= HEADER + SLACK, elapsed


def test_half_a_request_head_gets_408_and_the_connection_closes(proxy: int) -> None:
    check_half_head(proxy)


def test_a_head_sent_a_byte_at_a_time_has_one_deadline_for_the_whole(proxy: int) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
    with connect(proxy) as sock:
        started = time.monotonic()
        for byte in head:
            # each byte well within the deadline, the whole head not
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable:
                break
            sock.sendall(bytes([byte]))
        raw = read_to_close(sock)
        elapsed = time.monotonic() - started
    assert_408(raw)
    assert elapsed <= HEADER + SLACK, elapsed


def test_a_connection_that_sends_nothing_is_closed(proxy: int) -> None:
    with connect(proxy) as sock:
        started = time.monotonic()
        raw = read_to_close(sock)
        elapsed = time.monotonic() - started
    if raw:
        assert_408(raw)
    assert HEADER - 0.2 <= elapsed <= HEADER + SLACK, elapsed


def test_the_next_head_on_a_kept_alive_connection_has_its_own_deadline(proxy: int) -> None:
    """The deadline of a next request runs from its first byte, and it replaces the
    keep-alive timer (the connection is no longer idle)."""
    with connect(proxy) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = b""
        while b'"ok"' not in first:
            part = sock.recv(65536)
            assert part, first
            first += part
        assert parse(first).status == 200
        time.sleep(KEEPALIVE * 0.6)
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        raw = read_to_close(sock)
        elapsed = time.monotonic() - started
    assert_408(raw)
    assert HEADER - 0.2 <= elapsed <= HEADER + SLACK, elapsed


# -- the request body --


def _stalled_body(port: int, head: bytes, part: bytes) -> tuple[bytes, float]:
    with connect(port) as sock:
        sock.sendall(head + part)
        started = time.monotonic()
        raw = read_to_close(sock)
        return raw, time.monotonic() - started


def check_stalled_body(port: int) -> None:
    head = (
        b"POST " + CHAT + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    raw, elapsed = _stalled_body(port, head, b'{"model": ')
    assert_408(raw)
    assert BODY - 0.2 <= elapsed <= BODY + SLACK, elapsed


def test_a_body_that_pauses_gets_408_and_the_connection_closes(proxy: int) -> None:
    check_stalled_body(proxy)


def test_a_chunked_body_that_pauses_gets_408_and_the_connection_closes(proxy: int) -> None:
    head = (
        b"POST " + CHAT + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    raw, elapsed = _stalled_body(proxy, head, b'a\r\n{"model": \r\n')
    assert_408(raw)
    assert BODY - 0.2 <= elapsed <= BODY + SLACK, elapsed


def test_a_body_that_keeps_coming_is_not_cut_short(proxy: int) -> None:
    """`body` bounds each pause, not the whole body: one sent in pieces over more than
    `body` seconds is answered."""
    body = json.dumps(
        {"model": "test-model", "messages": [{"role": "user", "content": "slowly"}]}
    ).encode()
    head = (
        b"POST " + CHAT + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
    )
    pieces = [body[i : i + len(body) // 4 + 1] for i in range(0, len(body), len(body) // 4 + 1)]
    with connect(proxy) as sock:
        sock.sendall(head)
        started = time.monotonic()
        for piece in pieces:
            time.sleep(BODY * 0.5)
            sock.sendall(piece)
        assert time.monotonic() - started > BODY
        raw = read_to_close(sock)
    answer = parse(raw)
    assert answer.status == 200, raw[:500]
    assert json.loads(answer.body)["choices"][0]["message"]["content"] == "You said: slowly"


# -- keep-alive --


def test_an_idle_kept_alive_connection_is_closed(proxy: int) -> None:
    with connect(proxy) as sock:
        for _ in range(2):  # still kept alive after a first answer
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            got = b""
            while b'"ok"' not in got:
                part = sock.recv(65536)
                assert part, got
                got += part
            assert parse(got).status == 200
            answered = time.monotonic()
            time.sleep(KEEPALIVE * 0.5)
        raw = read_to_close(sock)
        elapsed = time.monotonic() - answered
    assert raw == b""
    assert KEEPALIVE - 0.2 <= elapsed <= KEEPALIVE + SLACK, elapsed


# -- a client that takes nothing of its answer --


def _stall(port: int, tag: str) -> socket.socket:
    """A client with a tiny receive buffer that asks for a stream, then reads nothing."""
    sock = connect(port, rcvbuf=1024)
    sock.sendall(chat_request(tag, stream=True))
    return sock


def check_stall_dropped(port: int, backend: StreamingBackend, tag: str) -> None:
    sock = _stall(port, tag)
    try:
        assert wait_for(lambda: backend.stream(tag) is not None, 10)
        record = backend.stream(tag)
        assert record is not None
        # the buffers between the two fill in well under a second, then `send` runs
        assert wait_for(lambda: record.ended is not None, SEND + 5), "the stream went on"
        assert record.gone, "the backend stream ran to its end instead of being cancelled"
        assert record.ended is not None
        assert record.ended - record.started <= SEND + 5
        assert_serves(port)
    finally:
        sock.close()


def test_a_client_that_takes_nothing_is_dropped_and_its_backend_request_cancelled(
    proxy: int, backend_thread: StreamingBackend
) -> None:
    check_stall_dropped(proxy, backend_thread, "forever-one")


def test_many_stalled_clients_do_not_starve_a_later_one(
    proxy: int, backend_thread: StreamingBackend
) -> None:
    """30 stalled streams behind a backend pool of 10: each is dropped after `send`,
    its place in the pool goes to the next, and a normal client is served."""
    tags = [f"forever-many-{i}" for i in range(30)]
    backend_thread.peak = 0
    socks = [_stall(proxy, tag) for tag in tags]
    try:
        time.sleep(SEND + 0.5)
        started = time.monotonic()
        assert_serves(proxy, "not starved", timeout=30)
        served = time.monotonic() - started
        assert wait_for(lambda: backend_thread.open_streams() == 0, 30)
        records = [backend_thread.stream(tag) for tag in tags]
        assert all(r is not None and r.gone for r in records), records
        assert backend_thread.peak == POOL  # the pool was full: the stalls held all of it
        # three rounds of ten, each dropped `send` seconds after its buffers filled
        assert served < 3 * (SEND + 3), served
    finally:
        for sock in socks:
            sock.close()


def test_the_standard_library_event_loop_too(
    asyncio_proxy: int, backend_thread: StreamingBackend
) -> None:
    check_half_head(asyncio_proxy)
    check_stalled_body(asyncio_proxy)
    check_stall_dropped(asyncio_proxy, backend_thread, "forever-asyncio")


# -- the defaults, and the wiring of the runner --


async def test_the_default_timeouts_reach_each_connection() -> None:
    config = load_text("upstreams:\n  - name: main\n    url: http://127.0.0.1:9/v1\n", env={})
    t = config.server.timeouts
    assert (t.header, t.body, t.keepalive, t.send) == (60, 60, 75, 60)
    runner = LimitedRunner(build_app(config), t, access_log=None)
    await runner.setup()
    try:
        assert runner.server is not None
        assert runner.server.handler_cancellation
        conn = runner.server()
        assert isinstance(conn, ClientConnection)
        assert (conn.header_timeout, conn.keepalive_timeout, conn.send_timeout) == (60, 75, 60)
    finally:
        await runner.cleanup()
