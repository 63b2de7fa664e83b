"""The backends' HTTP/1.1 client against real sockets.

(Long: one scripted server and a test per behaviour of the wire, kept together so
that the server's helpers are shared without a module of their own.)

Each test runs a small scripted server on 127.0.0.1 that reads the request and
writes exact bytes, and checks what a caller of `Pool` and `Response` sees: the
status, headers and body, the exceptions, and (counting the connections the server
accepted) whether a connection was reused. Every coroutine test runs once on the
default event loop and once more on uvloop, which the proxy uses where installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import ssl
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from proxy.backend import (
    BodyTooLarge,
    ClientError,
    ConnectTimeout,
    Disconnected,
    PoolFull,
    ResponseError,
    request_target,
)
from proxy.backend.http1 import Pool, Response
from proxy.backend.http1.connection import HIGH_WATER, _Conn

# -- the scripted server


class Peer:
    """The server's end of one accepted connection."""

    def __init__(
        self,
        backend: Backend,
        index: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.backend = backend
        self.index = index  # 0 for the first connection the server accepted
        self.reader = reader
        self.writer = writer
        self.received = b""  # every byte the client sent on this connection

    async def request(self) -> bytes | None:
        """One whole request, head and Content-Length body; None when the client
        closed the connection instead."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if isinstance(exc, asyncio.IncompleteReadError):
                self.received += exc.partial
            self.backend.eofs += 1
            return None
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        raw = head + await self.reader.readexactly(length)
        self.received += raw
        self.backend.requests.append(raw)
        return raw

    async def send(self, *parts: bytes, pause: float = 0.0) -> None:
        """Write each part on its own, `pause` seconds apart."""
        for i, part in enumerate(parts):
            if i and pause:
                await asyncio.sleep(pause)
            self.writer.write(part)
            await self.writer.drain()

    async def until_eof(self) -> None:
        """Wait for the client to close the connection."""
        try:
            while data := await self.reader.read(65536):
                self.received += data
        except ConnectionError:
            pass
        self.backend.eofs += 1


Script = Callable[[Peer], Awaitable[None]]


class Backend:
    """A server on 127.0.0.1 that runs `script` for each connection it accepts."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.accepted = 0
        self.open = 0
        self.max_open = 0  # the most connections open at once
        self.eofs = 0  # connections on which the server saw the client close
        self.requests: list[bytes] = []  # every whole request, in arrival order
        self.peers: list[Peer] = []
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(
        self, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.server = await asyncio.start_server(self._serve, host, 0, ssl=ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(self, self.accepted, reader, writer)
        self.peers.append(peer)
        self.accepted += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            await self.script(peer)
        except (asyncio.CancelledError, asyncio.IncompleteReadError, ConnectionError):
            pass  # the test is over, or the client went away mid-script
        finally:
            self.open -= 1
            writer.close()
            self._tasks.discard(task)

    async def seen_closed(self, n: int) -> None:
        """Wait until the server has seen the client close `n` connections."""
        await until(lambda: self.eofs == n)

    async def stop(self) -> None:
        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def serving(script: Script, **pool_options: Any) -> AsyncIterator[tuple[Backend, Pool]]:
    backend = Backend(script)
    await backend.start()
    pool = Pool("http", "127.0.0.1", backend.port, **pool_options)
    try:
        yield backend, pool
    finally:
        await pool.close()
        await backend.stop()


def ok(body: bytes = b"ok", *headers: bytes) -> bytes:
    """A 200 answer with a Content-Length body."""
    extra = b"".join(h + b"\r\n" for h in headers)
    return b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)


def answers(*responses: bytes) -> Script:
    """Answer each request, on whichever connection it comes, with the next of
    `responses` in one write, and wait for the next request on that connection."""
    queue = list(responses)

    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(queue.pop(0))

    return script


def per_connection(*scripts: Script) -> Script:
    """The first connection runs the first script, the second the second, and so on."""

    async def script(peer: Peer) -> None:
        await scripts[peer.index](peer)

    return script


async def until(condition: Callable[[], bool], timeout: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not come true in time")
        await asyncio.sleep(0.001)


async def get(pool: Pool, target: str = "/", timeout: float = 1.0) -> Response:
    return await pool.request("GET", target, [], None, timeout=timeout)


async def fetch(pool: Pool, target: str = "/") -> tuple[int, bytes]:
    """A GET read to its end and released: the status and the body."""
    resp = await get(pool, target)
    body = await resp.read(1.0)
    resp.release()
    return resp.status, body


async def chunks(resp: Response, timeout: float = 1.0) -> list[bytes]:
    """The body as `read_chunk` hands it over."""
    out = []
    while chunk := await resp.read_chunk(timeout):
        out.append(chunk)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- the request on the wire


async def test_request_line_host_headers_in_order_length_and_body() -> None:
    async with serving(answers(ok(b"{}"), ok(), ok())) as (backend, pool):
        headers = [("Authorization", "Bearer k"), ("X-Zeta", "z"), ("accept", "*/*")]
        resp = await pool.request(
            "POST", "/v1/chat/completions?x=1", headers, b'{"a": 1}', timeout=1
        )
        assert resp.status == 200
        assert await resp.read(1) == b"{}"
        resp.release()
        for body in (None, b""):
            resp = await pool.request("PUT", "/v1/x", [("X-A", "1")], body, timeout=1)
            await resp.read(1)
            resp.release()
    host = f"Host: 127.0.0.1:{backend.port}\r\n".encode()
    assert backend.requests == [
        b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n"
        + host
        + b"Authorization: Bearer k\r\nX-Zeta: z\r\naccept: */*\r\n"
        b"Content-Length: 8\r\n\r\n"
        b'{"a": 1}',
        b"PUT /v1/x HTTP/1.1\r\n" + host + b"X-A: 1\r\n\r\n",  # no body: no length
        b"PUT /v1/x HTTP/1.1\r\n" + host + b"X-A: 1\r\nContent-Length: 0\r\n\r\n",
    ]
    assert backend.accepted == 1


async def test_host_header_leaves_out_the_default_port() -> None:
    assert Pool("http", "backend.example", None).host_header == "backend.example"
    assert Pool("http", "backend.example", 80).host_header == "backend.example"
    assert Pool("http", "backend.example", 443).host_header == "backend.example:443"
    assert Pool("https", "backend.example", None).host_header == "backend.example"
    assert Pool("https", "backend.example", 80).host_header == "backend.example:80"
    assert Pool("http", "::1", 80).host_header == "[::1]"


async def test_host_header_brackets_an_ipv6_literal() -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    backend = Backend(answers(ok(b"six")))
    await backend.start("::1")
    pool = Pool("http", "::1", backend.port)
    try:
        assert await fetch(pool, "/x") == (200, b"six")
    finally:
        await pool.close()
        await backend.stop()
    assert backend.requests == [f"GET /x HTTP/1.1\r\nHost: [::1]:{backend.port}\r\n\r\n".encode()]


async def test_a_line_break_in_the_request_head_is_refused_and_nothing_is_sent() -> None:
    async with serving(answers(ok(b"fine"))) as (backend, pool):
        bad: list[tuple[str, list[tuple[str, str]]]] = [
            ("/", [("X-A", "a\r\nX-Injected: 1")]),
            ("/", [("X-A", "a\nX-Injected: 1")]),
            ("/", [("X-A", "a\rX-Injected: 1")]),
            ("/", [("X-A\r\nX-Injected", "1")]),
            ("/ HTTP/1.1\r\nX-Injected: 1\r\nX-A:", []),
        ]
        for target, headers in bad:
            with pytest.raises(ValueError):
                await pool.request("GET", target, headers, b"body", timeout=1)
        await backend.seen_closed(len(bad))
        assert await fetch(pool) == (200, b"fine")
    assert [p.received for p in backend.peers[: len(bad)]] == [b""] * len(bad)
    assert backend.requests == [
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{backend.port}\r\n\r\n".encode()
    ]


# -- response heads and bodies


async def test_heads_whose_lines_end_in_a_bare_lf_are_read() -> None:
    async with serving(
        answers(
            b"HTTP/1.1 200 OK\nX-A: 1\nContent-Length: 4\n\n\nabc",
            b"HTTP/1.1 201 Made\r\nX-B: 2\nContent-Length: 2\r\n\nok",
        )
    ) as (_, pool):
        resp = await get(pool)
        assert (resp.status, resp.reason, resp.headers["x-a"]) == (200, "OK", "1")
        assert await resp.read(1) == b"\nabc"  # the body starts after the blank line
        resp.release()
        resp = await get(pool)  # mixed line ends, on the same connection
        assert (resp.status, resp.reason, resp.headers["x-b"]) == (201, "Made", "2")
        assert await resp.read(1) == b"ok"
        resp.release()


async def test_status_reason_and_headers() -> None:
    head = (
        b"HTTP/1.1 404 Not Found Here\r\n"
        b"X-A: 1\r\n"
        b"x-a:2\r\n"
        b"X-Empty:\r\n"
        b"X-Padded:   v w  \r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    async with serving(answers(head, b"HTTP/1.1 201\r\nContent-Length: 0\r\n\r\n")) as (_, pool):
        resp = await get(pool)
        assert (resp.status, resp.reason) == (404, "Not Found Here")
        assert resp.headers == {
            "x-a": "1, 2",
            "x-empty": "",
            "x-padded": "v w",
            "content-length": "0",
        }
        assert await resp.read(1) == b""
        resp.release()
        resp = await get(pool)
        assert (resp.status, resp.reason) == (201, "")
        resp.release()


async def test_content_length_body_in_one_write() -> None:
    async with serving(answers(ok(b"hello world", b"Content-Type: text/plain"))) as (_, pool):
        resp = await get(pool)
        assert resp.headers["content-type"] == "text/plain"
        assert await resp.read(1) == b"hello world"
        assert resp.complete
        assert await resp.read_chunk(1) == b""
        resp.release()


async def test_content_length_head_and_body_byte_by_byte() -> None:
    wire = ok(b"0123456789abcdef")

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(*(wire[i : i + 1] for i in range(len(wire))), pause=0.001)
        await peer.until_eof()

    async with serving(script) as (_, pool):
        resp = await get(pool)
        assert resp.status == 200
        got = await chunks(resp)
        assert b"".join(got) == b"0123456789abcdef"
        assert len(got) > 1  # handed over as it came
        resp.release()


async def test_zero_content_length() -> None:
    async with serving(answers(ok(b""), ok(b"next"))) as (backend, pool):
        resp = await get(pool)
        assert resp.complete
        assert await resp.read(1) == b""
        resp.release()
        assert await fetch(pool) == (200, b"next")
    assert backend.accepted == 1


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
CHUNKED = (
    b"5;x=y\r\nhello\r\n"
    b"1A\r\nabcdefghijklmnopqrstuvwxyz\r\n"
    b'3 ; name="quoted"\r\n123\r\n'
    b"0\r\nX-Trailer: t\r\nX-More: u\r\n\r\n"
)
CHUNKED_BODY = b"helloabcdefghijklmnopqrstuvwxyz123"


async def test_chunked_body_split_in_two_at_every_byte() -> None:
    splits = range(1, len(CHUNKED))

    async def script(peer: Peer) -> None:
        for i in splits:
            await peer.request()
            await peer.send(CHUNKED_HEAD + CHUNKED[:i], CHUNKED[i:], pause=0.001)
        await peer.until_eof()

    async with serving(script) as (backend, pool):
        for i in splits:
            assert await fetch(pool) == (200, CHUNKED_BODY), i
    assert backend.accepted == 1  # each body ended where it should: the connection was reused


async def test_chunked_body_byte_by_byte() -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(
            CHUNKED_HEAD, *(CHUNKED[i : i + 1] for i in range(len(CHUNKED))), pause=0.001
        )
        await answers(ok(b"after"))(peer)

    async with serving(script) as (backend, pool):
        resp = await get(pool)
        got = await chunks(resp)
        assert b"".join(got) == CHUNKED_BODY
        assert len(got) > 3
        assert resp.complete
        resp.release()
        assert await fetch(pool) == (200, b"after")
    assert backend.accepted == 1


async def test_chunked_head_and_body_in_one_write() -> None:
    wire = CHUNKED_HEAD + CHUNKED
    async with serving(answers(wire, wire)) as (backend, pool):
        assert await fetch(pool) == (200, CHUNKED_BODY)
        assert await fetch(pool) == (200, CHUNKED_BODY)
    assert backend.accepted == 1


async def test_body_until_close_is_read_to_the_close_and_not_reused() -> None:
    async def until_close(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n\r\nfirst ", b"second", pause=0.01)

    async def http10(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nold")

    async with serving(per_connection(until_close, http10, answers(ok()))) as (backend, pool):
        assert await fetch(pool) == (200, b"first second")
        assert await fetch(pool) == (200, b"old")
        assert await fetch(pool) == (200, b"ok")
    assert backend.accepted == 3


async def test_no_body_for_204_304_and_head() -> None:
    async with serving(
        answers(
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nETag: x\r\nContent-Length: 10\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            ok(b"last"),
        )
    ) as (backend, pool):
        assert await fetch(pool) == (204, b"")
        assert await fetch(pool) == (304, b"")
        for _ in range(2):
            resp = await pool.request("HEAD", "/", [], None, timeout=1)
            assert resp.status == 200
            assert resp.complete
            assert await resp.read(1) == b""
            resp.release()
        assert await fetch(pool) == (200, b"last")
    assert backend.accepted == 1


async def test_interim_answers_are_skipped() -> None:
    async def split(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 100 Continue\r\n\r\n", ok(b"late"), pause=0.01)
        await peer.until_eof()

    together = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n" + ok(b"both")
    )
    async with serving(per_connection(answers(together), split)) as (_, pool):
        resp = await get(pool)
        assert resp.status == 200
        assert "link" not in resp.headers
        assert await resp.read(1) == b"both"
        resp.close()
        assert await fetch(pool) == (200, b"late")


# -- keep-alive


async def test_a_body_read_to_its_end_gives_the_connection_back() -> None:
    async with serving(answers(ok(b"one"), ok(b"two"), ok(b"three"))) as (backend, pool):
        for body in (b"one", b"two", b"three"):
            assert await fetch(pool) == (200, body)
        assert pool.open_connections == 1
    assert backend.accepted == 1
    assert len(backend.requests) == 3


async def test_release_before_the_end_closes_the_connection() -> None:
    async def partial(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await peer.until_eof()

    async with serving(per_connection(partial, answers(ok()))) as (backend, pool):
        resp = await get(pool)
        assert await resp.read_chunk(1) == b"0123456789"
        assert not resp.complete
        resp.release()
        await backend.seen_closed(1)  # the backend sees the client go
        assert pool.open_connections == 0
        assert await fetch(pool) == (200, b"ok")
    assert backend.accepted == 2


async def test_close_after_the_whole_body_still_closes() -> None:
    async with serving(answers(ok(b"a"), ok(b"b"))) as (backend, pool):
        resp = await get(pool)
        assert await resp.read(1) == b"a"
        resp.close()
        resp.release()  # no effect after close
        await backend.seen_closed(1)
        assert await fetch(pool) == (200, b"b")
    assert backend.accepted == 2


async def test_connection_close_and_http10_answers_are_not_reused() -> None:
    async with serving(
        answers(
            ok(b"1", b"Connection: close"),
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n2",
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n3",
            ok(b"4"),
        )
    ) as (backend, pool):
        assert await fetch(pool) == (200, b"1")
        await backend.seen_closed(1)  # the client closed it, though the backend did not
        assert await fetch(pool) == (200, b"2")
        await backend.seen_closed(2)
        assert await fetch(pool) == (200, b"3")
        assert await fetch(pool) == (200, b"4")  # HTTP/1.0 with keep-alive: reused
    assert backend.accepted == 3


async def test_bytes_past_the_end_of_the_body_spoil_the_connection() -> None:
    extra = b"HTTP/1.1 200 OK\r\n"
    script = answers(ok(b"ok") + extra, CHUNKED_HEAD + CHUNKED + extra, ok(b"next"))
    async with serving(script) as (backend, pool):
        assert await fetch(pool) == (200, b"ok")
        assert await fetch(pool) == (200, CHUNKED_BODY)
        assert await fetch(pool) == (200, b"next")
    assert backend.accepted == 3


async def test_a_connection_the_backend_closes_while_idle_is_dropped() -> None:
    async def once(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(b"first"))

    async with serving(per_connection(once, answers(ok(b"second")))) as (backend, pool):
        assert await fetch(pool) == (200, b"first")
        await until(lambda: pool.open_connections == 0)
        assert await fetch(pool) == (200, b"second")
    assert backend.accepted == 2


async def test_bytes_on_an_idle_connection_drop_it() -> None:
    async def chatty(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(b"first"), b"HTTP/1.1 200 OK\r\n\r\n", pause=0.02)
        await peer.until_eof()

    async with serving(per_connection(chatty, answers(ok(b"second")))) as (backend, pool):
        assert await fetch(pool) == (200, b"first")
        await backend.seen_closed(1)
        assert pool.open_connections == 0
        assert await fetch(pool) == (200, b"second")
    assert backend.accepted == 2


async def test_a_connection_closed_as_the_request_is_written_raises_disconnected() -> None:
    async def closes_on_second(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(b"first"))
        await peer.request()  # then close without a word

    async with serving(per_connection(closes_on_second, answers(ok(b"again")))) as (backend, pool):
        assert await fetch(pool) == (200, b"first")
        with pytest.raises(Disconnected) as info:
            await get(pool)
        assert info.value.reused  # the idle pooled connection: the request may go again
        assert pool.open_connections == 0
        assert await fetch(pool) == (200, b"again")
    assert backend.accepted == 2
    assert len(backend.requests) == 3


async def test_a_backend_that_closes_at_once_raises_disconnected() -> None:
    async def hang_up(peer: Peer) -> None:
        pass

    async with serving(hang_up) as (_, pool):
        with pytest.raises(Disconnected) as info:
            await get(pool)
        assert not info.value.reused  # a fresh connection


async def test_a_fresh_connection_closed_after_the_request_is_not_marked_reused() -> None:
    async def takes_it_and_hangs_up(peer: Peer) -> None:
        await peer.request()  # the backend has the request, then closes without a word

    async with serving(takes_it_and_hangs_up) as (backend, pool):
        for method, body in (("GET", None), ("POST", b'{"a": 1}')):
            with pytest.raises(Disconnected) as info:
                await pool.request(method, "/", [], body, timeout=1)
            assert info.value.reused is False
            assert pool.open_connections == 0
    assert len(backend.requests) == 2  # both reached the backend


async def test_an_idle_connection_reset_by_the_backend_raises_disconnected_reused() -> None:
    async def resets_on_second(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(b"first"))
        await peer.request()
        sock = peer.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.writer.transport.abort()  # a reset rather than a FIN

    async with serving(resets_on_second) as (backend, pool):
        assert await fetch(pool) == (200, b"first")
        with pytest.raises(Disconnected) as info:
            await get(pool)
        assert info.value.reused
        assert pool.open_connections == 0


async def test_idle_connections_expire_after_idle_seconds() -> None:
    async with serving(answers(ok(b"1"), ok(b"2"), ok(b"3")), idle_seconds=0.05) as (backend, pool):
        assert await fetch(pool) == (200, b"1")
        assert await fetch(pool) == (200, b"2")  # within idle_seconds: reused
        assert backend.accepted == 1
        await asyncio.sleep(0.08)
        assert await fetch(pool) == (200, b"3")
        assert backend.accepted == 2
        await backend.seen_closed(1)  # and the expired one was closed
        assert pool.open_connections == 1


# -- errors


async def _refused(pool: Pool) -> BaseException:
    with pytest.raises(ClientError) as info:
        resp = await get(pool)
        await resp.read(1)
    return info.value


async def test_an_answer_that_is_not_http_raises_response_error() -> None:
    answers_ = [
        b"SSH-2.0-OpenSSH_9.6\r\n",  # a banner, then it waits
        b"<html><body>hello</body></html>\r\n\r\n",
        b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
    ]

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(answers_[peer.index])
        await peer.until_eof()

    async with serving(script) as (backend, pool):
        for answer in answers_:
            t0 = time.monotonic()
            with pytest.raises(ResponseError):
                await get(pool, timeout=2)
            assert time.monotonic() - t0 < 0.5, answer
        await backend.seen_closed(len(answers_))


async def test_garbage_then_close_raises_response_error() -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Le")

    async with serving(script) as (_, pool):
        with pytest.raises(ResponseError):
            await get(pool)


async def test_malformed_status_lines_and_headers_raise_response_error() -> None:
    heads = [
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 99 Low\r\n\r\n",
        b"HTTP/1.1 1000 High\r\n\r\n",
        b"HTTP/1.1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A : 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n: no name\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nab",  # a digit to str.isdigit
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Long: " + b"x" * (70 * 1024),  # then more: too long a head
        b"HTTP/1.1 200 OK\r\nX-Long: " + b"x" * (70 * 1024) + b"\r\n\r\n",  # in one piece
        b"HTTP/1.1 +200 OK\r\n\r\n",
        b"HTTP/1.1 2_00 OK\r\n\r\n",
        b"HTTP/1.1 \xb200 OK\r\n\r\n",
    ]

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(heads[peer.index], b"\r\n\r\n", pause=0.01)
        await peer.until_eof()

    async with serving(script) as (backend, pool):
        for head in heads:
            try:
                await get(pool)
            except ResponseError:
                pass
            else:
                raise AssertionError(f"no ResponseError for {head[:60]!r}")
            assert pool.open_connections == 0
        await backend.seen_closed(len(heads))


async def test_malformed_chunks_raise_response_error_from_read() -> None:
    bodies = [
        b"zz\r\nhello\r\n0\r\n\r\n",
        b"\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloXX0\r\n\r\n",  # no CRLF after the data
        b"1" * 5000,  # a size line with no end
    ]

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD, bodies[peer.index], pause=0.01)
        await peer.until_eof()

    async with serving(script) as (backend, pool):
        for body in bodies:
            resp = await get(pool)
            assert resp.status == 200
            with pytest.raises(ResponseError):
                await resp.read(1)
            resp.release()
            assert pool.open_connections == 0, body
        await backend.seen_closed(len(bodies))


async def test_a_body_cut_short_raises_response_error() -> None:
    def cut(*parts: bytes) -> Script:
        async def script(peer: Peer) -> None:
            await peer.request()
            await peer.send(*parts, pause=0.01)

        return script

    async with serving(
        per_connection(
            cut(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"),
            cut(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", b"hello"),
            cut(CHUNKED_HEAD, b"5\r\nhello\r\n"),
            cut(CHUNKED_HEAD, b"5\r\nhel"),
            cut(CHUNKED_HEAD, b"5\r\nhello\r\n0\r\nX-Trailer: t\r\n"),
        )
    ) as (_, pool):
        resp = await get(pool)
        assert await resp.read_chunk(1) == b"hello"
        with pytest.raises(ResponseError):
            await resp.read_chunk(1)
        resp.release()
        for _ in range(4):
            resp = await get(pool)
            with pytest.raises(ResponseError):
                await resp.read(1)
            resp.release()
        assert pool.open_connections == 0


async def test_connection_refused_raises_oserror_and_frees_the_slot() -> None:
    pool = Pool("http", "127.0.0.1", free_port(), limit=1)
    try:
        for _ in range(3):
            with pytest.raises(OSError):
                await get(pool)
        assert pool.open_connections == 0
    finally:
        await pool.close()


async def test_no_answer_within_the_timeout_raises_timeout_error() -> None:
    async def silent(peer: Peer) -> None:
        await peer.request()
        await peer.until_eof()

    async def half_a_head(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-")
        await peer.until_eof()

    async with serving(per_connection(silent, half_a_head)) as (backend, pool):
        for n in (1, 2):
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await get(pool, timeout=0.1)
            assert 0.09 < time.monotonic() - t0 < 0.6
            await backend.seen_closed(n)  # the connection is given up
            assert pool.open_connections == 0


async def test_read_chunk_times_out_when_the_backend_goes_quiet() -> None:
    go_on = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD + b"5\r\nhello\r\n")
        await go_on.wait()
        await peer.send(b"5\r\nworld\r\n0\r\n\r\n")
        await answers(ok(b"next"))(peer)

    async with serving(script) as (backend, pool):
        resp = await get(pool)
        assert await resp.read_chunk(1) == b"hello"
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await resp.read_chunk(0.05)
        assert 0.04 < time.monotonic() - t0 < 0.5
        go_on.set()  # the answer goes on after a timeout
        assert await resp.read(1) == b"world"
        resp.release()
        assert await fetch(pool) == (200, b"next")
    assert backend.accepted == 1


async def test_quiet_streams_each_time_out_at_their_own_deadline() -> None:
    """Body reads waiting together (the pool keeps their deadlines with one timer):
    each ends at its own timeout, a stream that keeps sending is never ended, and a
    later, shorter wait is not held back by an earlier, longer one."""
    stop = asyncio.Event()

    async def quiet(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD + b"5\r\nhello\r\n")
        await stop.wait()

    async def chatty(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD)
        while not stop.is_set():
            await peer.send(b"1\r\nx\r\n")
            await asyncio.sleep(0.02)

    async with serving(per_connection(quiet, quiet, quiet, chatty), limit=4) as (_, pool):
        streams = [await get(pool) for _ in range(4)]
        for resp in streams[:3]:
            assert await resp.read_chunk(1) == b"hello"

        async def ends(resp: Response, timeout: float) -> float:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await resp.read_chunk(timeout)
            return time.monotonic() - t0

        async def keeps_going(resp: Response) -> int:
            n = 0
            deadline = time.monotonic() + 0.6
            while time.monotonic() < deadline:
                n += len(await resp.read_chunk(0.1))
            return n

        long = asyncio.ensure_future(ends(streams[0], 0.5))
        await asyncio.sleep(0.05)
        short = asyncio.ensure_future(ends(streams[1], 0.1))
        middle = asyncio.ensure_future(ends(streams[2], 0.3))
        sent = await keeps_going(streams[3])
        waited = await asyncio.gather(long, short, middle)
        stop.set()
        assert 0.49 < waited[0] < 0.7, waited
        assert 0.09 < waited[1] < 0.25, waited
        assert 0.29 < waited[2] < 0.45, waited
        assert sent >= 10
        assert not pool._watched  # nothing left waiting


async def test_a_request_that_finds_every_place_taken_gets_pool_full_after_pool_timeout() -> None:
    hold = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD + b"5\r\nhello\r\n")
        await hold.wait()

    async with serving(script, limit=1, pool_timeout=0.1) as (_, pool):
        first = await get(pool)
        t0 = time.monotonic()
        with pytest.raises(PoolFull) as caught:
            await get(pool, timeout=5)
        assert 0.09 < time.monotonic() - t0 < 0.5
        assert caught.value.limit == 1 and 0.09 < caught.value.waited < 0.5
        assert isinstance(caught.value, ConnectTimeout)  # never sent: may go elsewhere
        first.close()
        hold.set()


# -- the connection limit


async def test_at_most_limit_connections_and_the_next_request_waits_for_one() -> None:
    async with serving(answers(*[ok(b"x")] * 6), limit=2) as (backend, pool):
        tasks = [asyncio.create_task(get(pool, timeout=2)) for _ in range(3)]
        await until(lambda: sum(t.done() for t in tasks) == 2)
        await asyncio.sleep(0.02)
        done = [t for t in tasks if t.done()]
        pending = {t for t in tasks if not t.done()}
        assert (len(done), backend.accepted, pool.open_connections) == (2, 2, 2)
        first, second = (t.result() for t in done)
        assert await first.read(1) == b"x"
        first.release()  # back to the pool: the third request takes it
        third = await asyncio.wait_for(pending.pop(), 0.5)
        assert await third.read(1) == b"x"
        assert (backend.accepted, backend.max_open) == (2, 2)

        waiting = asyncio.create_task(get(pool, timeout=2))
        await asyncio.sleep(0.02)
        assert not waiting.done()
        second.close()  # closed unread: its place goes to the next request
        fourth = await asyncio.wait_for(waiting, 0.5)
        assert (backend.accepted, pool.open_connections) == (3, 2)
        assert await fourth.read(1) == b"x"
        third.release()
        fourth.release()
        assert pool.open_connections == 2
    assert backend.max_open <= 3  # the closed one may not have been noticed yet


async def test_a_waiter_whose_deadline_passes_gets_timeout_error() -> None:
    async with serving(answers(ok(b"1"), ok(b"2")), limit=1) as (backend, pool):
        held = await get(pool)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await get(pool, timeout=0.05)
        assert 0.04 < time.monotonic() - t0 < 0.5
        assert await held.read(1) == b"1"
        held.release()
        assert await fetch(pool) == (200, b"2")  # the place was not lost
    assert backend.accepted == 1


async def test_cancelling_a_just_woken_waiter_passes_the_turn_on() -> None:
    async with serving(answers(ok(b"1"), ok(b"2")), limit=1) as (backend, pool):
        held = await get(pool)
        assert await held.read(1) == b"1"
        woken = asyncio.create_task(get(pool, timeout=5))
        next_ = asyncio.create_task(get(pool, timeout=5))
        await asyncio.sleep(0.01)
        assert not woken.done() and not next_.done()
        held.release()  # wakes the first waiter...
        woken.cancel()  # ...which is cancelled before it runs
        resp = await asyncio.wait_for(next_, 0.5)
        assert await resp.read(1) == b"2"
        resp.release()
        assert woken.cancelled()
    assert backend.accepted == 1


async def test_a_freed_place_goes_to_the_first_waiter_not_to_a_newcomer() -> None:
    async with serving(answers(ok(b"1"), ok(b"2"), ok(b"3")), limit=1) as (backend, pool):

        async def use() -> bytes:
            resp = await get(pool, timeout=5)
            body = await resp.read(1)
            resp.release()
            return body

        held = await get(pool)
        assert await held.read(1) == b"1"
        first = asyncio.create_task(use())
        await asyncio.sleep(0.01)
        held.release()  # the place is the first waiter's...
        newcomer = await use()  # ...not this request's, although it asks at once
        assert await first == b"2"
        assert newcomer == b"3"
        assert pool.open_connections == 1
    assert backend.accepted == 1


async def test_closing_the_pool_fails_waiters_and_closes_connections_in_use() -> None:
    async with serving(answers(ok(b"1"))) as (backend, _):
        pool = Pool("http", "127.0.0.1", backend.port, limit=1)
        held = await get(pool)
        waiter = asyncio.create_task(get(pool))
        await asyncio.sleep(0.01)
        await pool.close()
        with pytest.raises(ClientError):
            await waiter
        with pytest.raises(ClientError):
            await get(pool)
        assert await held.read(1) == b"1"  # the answer in flight is not cut
        held.release()
        await backend.seen_closed(1)


# -- flow control


async def test_an_unread_large_body_pauses_the_backend_until_read() -> None:
    block = bytes(range(256)) * 256
    total = 24 * 1024 * 1024  # well beyond what the socket buffers hold
    written = 0

    async def script(peer: Peer) -> None:
        nonlocal written
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        while written < total:
            peer.writer.write(block)
            written += len(block)
            await peer.writer.drain()
        await peer.until_eof()

    async with serving(script) as (_, pool):
        resp = await get(pool)
        await asyncio.sleep(0.1)
        stalled = written
        await asyncio.sleep(0.05)
        assert written == stalled < total  # the backend's writes block
        first = await resp.read_chunk(1)
        assert 0 < len(first) <= HIGH_WATER + 512 * 1024  # what was buffered stays bounded
        got = len(first)
        while chunk := await resp.read_chunk(1):
            assert len(chunk) <= HIGH_WATER + 512 * 1024
            got += len(chunk)
        assert got == total == written
        assert resp.complete
        resp.release()


# -- TLS


async def test_https_through_tls() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        try:
            openssl = await asyncio.create_subprocess_exec(
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            made = await asyncio.wait_for(openssl.wait(), 10) == 0
        except (OSError, TimeoutError):
            made = False
        if not made:
            pytest.skip("openssl cannot make a test certificate here")
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cert, key)
        client_ctx = ssl.create_default_context(cafile=str(cert))
    backend = Backend(answers(ok(b"secret"), CHUNKED_HEAD + CHUNKED))
    await backend.start(ssl_context=server_ctx)
    pool = Pool("https", "127.0.0.1", backend.port, ssl_context=client_ctx)
    try:
        assert await fetch(pool) == (200, b"secret")
        assert await fetch(pool) == (200, CHUNKED_BODY)
    finally:
        await pool.close()
        await backend.stop()
    assert backend.accepted == 1
    assert (
        backend.requests[0] == f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{backend.port}\r\n\r\n".encode()
    )


# -- a request not written whole, and answers that come before their time


async def test_an_answer_before_the_whole_request_went_out_closes_the_connection() -> None:
    """A backend that answers after the head alone (a 413 for a large body) and keeps
    the connection open: what is left of the body must not reach it ahead of the next
    request, so the connection is closed (cut, not flushed) and the next request goes
    on a new one."""
    body = b"x" * (16 * 1024 * 1024)  # more than the socket buffers hold
    answered = asyncio.Event()
    released = asyncio.Event()

    async def early(peer: Peer) -> None:
        head = await peer.reader.readuntil(b"\r\n\r\n")
        peer.received += head
        await peer.send(
            b"HTTP/1.1 413 Payload Too Large\r\nConnection: keep-alive\r\n"
            b'Content-Length: 11\r\n\r\n{"e":"big"}'
        )
        answered.set()
        await released.wait()
        await peer.until_eof()  # whatever comes now on this connection

    async with serving(per_connection(early, answers(ok(b"second")))) as (backend, pool):
        resp = await pool.request("POST", "/", [], body, timeout=5)
        assert resp.status == 413
        assert await resp.read(1) == b'{"e":"big"}'
        resp.release()
        released.set()
        await backend.seen_closed(1)
        assert await fetch(pool) == (200, b"second")
    assert backend.accepted == 2
    assert len(backend.peers[0].received) < len(body)  # the rest was never sent
    assert backend.requests == [
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{backend.port}\r\n\r\n".encode()
    ]
    assert answered.is_set()


async def test_a_request_written_whole_before_the_answer_keeps_the_connection() -> None:
    body = b"y" * (4 * 1024 * 1024)
    async with serving(answers(ok(b"took it"), ok(b"again"))) as (backend, pool):
        resp = await pool.request("POST", "/", [], body, timeout=5)
        assert await resp.read(1) == b"took it"
        resp.release()
        assert await fetch(pool) == (200, b"again")
    assert backend.accepted == 1
    assert backend.requests[0].endswith(body)


async def test_a_body_sent_to_a_head_request_spoils_the_connection() -> None:
    script = answers(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", ok(b"next"))
    async with serving(script) as (backend, pool):
        resp = await pool.request("HEAD", "/", [], None, timeout=1)
        assert (resp.status, resp.headers["content-length"]) == (200, "5")
        assert await resp.read(1) == b""
        await asyncio.sleep(0.02)  # the stray body arrives
        resp.release()
        assert await fetch(pool) == (200, b"next")  # on a new connection
    assert backend.accepted == 2


async def test_switching_protocols_unasked_raises_response_error() -> None:
    script = answers(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n" + ok(b"no"))
    async with serving(script) as (backend, pool):
        with pytest.raises(ResponseError):
            await get(pool)
        assert pool.open_connections == 0
        await backend.seen_closed(1)


class _Transport:
    """A transport that records what the protocol does with it."""

    def __init__(self) -> None:
        self.closed = False
        self.pending = 0  # bytes in the write buffer

    def get_write_buffer_size(self) -> int:
        return self.pending

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_bytes_before_the_request_is_written_are_refused() -> None:
    # a fresh connection the backend speaks on first: its bytes answer nothing
    conn = _Conn(object())  # type: ignore[arg-type]
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert transport.closed
    assert isinstance(conn._error, ResponseError)
    assert conn.status == 0 and not conn.reusable()


# -- control characters and malformed names in the backend's head

BAD_HEADS = [
    b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Bad: a\rb\r\nContent-Length: 0\r\n\r\n",  # a bare CR in a value
    b"HTTP/1.1 200 OK\r\nX-Bad: a\r\r\nContent-Length: 0\r\n\r\n",  # CR CR LF
    b"HTTP/1.1 200 OK\rX-Bad: a\r\nContent-Length: 0\r\n\r\n",  # a bare CR as a line end
    b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Bad: a\x0bb\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Bad: a\x1fb\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Bad: a\x7fb\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Bad: \x1b[31mred\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX\x00Bad: a\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX Bad: a\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX(Bad): a\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX/Bad: a\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-B\xe9d: a\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\tX-Bad: a\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\tfolded\r\nContent-Length: 0\r\n\r\n",  # obs-fold
    b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n",  # in the reason phrase
    b"HTTP/1.1 200 O\rK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\nX-Bad: a\x00b\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-Bad: a\x00b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x=\x00\r\nhi\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;a\rb\r\nhi\r\n0\r\n\r\n",
]


async def test_control_characters_and_bad_names_raise_response_error() -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(BAD_HEADS[peer.index])
        await peer.until_eof()

    async with serving(script) as (backend, pool):
        for wire in BAD_HEADS:
            with pytest.raises(ResponseError):
                resp = await get(pool)
                try:
                    await resp.read(1)
                finally:
                    resp.release()
            assert pool.open_connections == 0, wire
        await backend.seen_closed(len(BAD_HEADS))


async def test_tabs_obs_text_and_blanks_in_values() -> None:
    head = (
        b"HTTP/1.1 200 \xc9t\xe9\tok\r\n"
        b"X-Tab: a\tb\r\n"
        b"X-Text: caf\xe9 \x80\xff\r\n"
        b"X-Nbsp: \xa0v\xa0\r\n"  # U+00A0 is no blank to HTTP: kept
        b"X-Blanks: \t v \t\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    async with serving(answers(head)) as (_, pool):
        resp = await get(pool)
        assert resp.reason == "\xc9t\xe9\tok"
        assert resp.headers["x-tab"] == "a\tb"
        assert resp.headers["x-text"] == "caf\xe9 \x80\xff"  # latin-1, as they came
        assert resp.headers["x-nbsp"] == "\xa0v\xa0"
        assert resp.headers["x-blanks"] == "v"
        resp.release()


async def test_a_head_ends_at_its_first_empty_line_whatever_the_line_ends() -> None:
    async with serving(
        answers(
            # a bare LF, then CRLF for the empty line; the body holds CRLFCRLF
            b"HTTP/1.1 200 OK\nContent-Length: 8\n\r\nbody\r\n\r\n",
            # CRLF lines and one bare LF in between: two headers, not one with an LF
            b"HTTP/1.1 200 OK\r\nX-A: 1\nX-B: 2\r\nContent-Length: 2\r\n\r\nok",
        )
    ) as (backend, pool):
        resp = await get(pool)
        assert resp.headers == {"content-length": "8"}
        assert await resp.read(1) == b"body\r\n\r\n"
        resp.release()
        resp = await get(pool)
        assert resp.headers == {"x-a": "1", "x-b": "2", "content-length": "2"}
        assert await resp.read(1) == b"ok"
        resp.release()
    assert backend.accepted == 1


async def test_framing_headers_are_checked_as_rfc_9112_asks() -> None:
    async with serving(
        answers(
            # one length sent twice, or twice in one field: that length
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2 , 2\r\n\r\ncd",
            # chunked and a length: chunked wins, and the connection is not kept
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: Chunked\r\n\r\n"
            b"2\r\nef\r\n0\r\n\r\n",
            ok(b"gh"),
        )
    ) as (backend, pool):
        for expected in (b"ab", b"cd"):
            resp = await get(pool)
            assert resp.headers["content-length"] == "2"
            assert await resp.read(1) == expected
            resp.release()
        assert await fetch(pool) == (200, b"ef")
        assert await fetch(pool) == (200, b"gh")
    assert backend.accepted == 2

    refused = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 02\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 19 + b"\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nContent-Length: x\r\n\r\n",  # checked with no body too
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n 2\r\nab\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 17 + b"\r\n",
    ]

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(refused[peer.index])
        await peer.until_eof()

    async with serving(script) as (backend, pool):
        for wire in refused:
            with pytest.raises(ResponseError):
                resp = await get(pool)
                try:
                    await resp.read(1)
                finally:
                    resp.release()
            assert pool.open_connections == 0, wire


async def test_connection_tokens_decide_keep_alive() -> None:
    async with serving(
        answers(
            ok(b"1", b"Connection: Keep-Alive, x-close"),  # no close token: kept
            ok(b"2", b"Connection: x-trace, CLOSE"),  # close among others: closed
            b"HTTP/1.0 200 OK\r\nConnection: x, keep-alive\r\nContent-Length: 1\r\n\r\n3",
            ok(b"4"),
        )
    ) as (backend, pool):
        for n in (b"1", b"2", b"3", b"4"):
            assert await fetch(pool) == (200, n)
    assert backend.accepted == 2


# -- read(limit=...)


async def test_read_past_its_limit_raises_body_too_large_and_closes() -> None:
    big = b"z" * 1000

    async def chunked(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD, b"190\r\n" + big[:400] + b"\r\n", pause=0.01)
        await peer.send(b"258\r\n" + big[:600] + b"\r\n0\r\n\r\n")
        await peer.until_eof()

    async def length(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(big))
        await peer.until_eof()

    script = per_connection(chunked, length, answers(ok(big), ok(b"after")))
    async with serving(script) as (backend, pool):
        resp = await get(pool)
        with pytest.raises(BodyTooLarge) as info:
            await resp.read(1, limit=999)
        assert info.value.limit == 999 and isinstance(info.value, ClientError)
        resp.release()  # no effect: already closed
        await backend.seen_closed(1)

        resp = await get(pool)
        with pytest.raises(BodyTooLarge):
            await resp.read(1, limit=999)  # the Content-Length says so: at once
        await backend.seen_closed(2)
        assert pool.open_connections == 0

        resp = await get(pool)  # exactly the limit: read, and the connection kept
        assert await resp.read(1, limit=1000) == big
        resp.release()
        assert await fetch(pool) == (200, b"after")
    assert backend.accepted == 3


# -- request_target


def test_request_target_joins_the_base_path_and_the_path() -> None:
    assert request_target("", "/chat/completions", "") == "/chat/completions"
    assert request_target("/api/v1", "/chat/completions", "") == "/api/v1/chat/completions"
    assert request_target("/a", "/b:c@d!$&'()*+,;=-._~", "") == "/a/b:c@d!$&'()*+,;=-._~"


def test_request_target_percent_encodes_unsafe_characters() -> None:
    assert request_target("/api", "/a b", "") == "/api/a%20b"
    assert request_target("", "/caf\u00e9/\u6a21\u578b", "") == "/caf%C3%A9/%E6%A8%A1%E5%9E%8B"
    assert request_target("", "/100%", "") == "/100%25"  # the path comes decoded
    assert request_target("", '/a"<>`{}|\\^#?', "") == "/a%22%3C%3E%60%7B%7D%7C%5C%5E%23%3F"


def test_request_target_keeps_an_encoded_base_path_as_it_is() -> None:
    # the base path is the upstream URL's raw (already encoded) path
    assert request_target("/my%20api/v1", "/chat/completions", "") == (
        "/my%20api/v1/chat/completions"
    )
    assert request_target("/my%20api", "/a b", "") == "/my%20api/a%20b"


def test_request_target_appends_the_raw_query_as_given() -> None:
    assert request_target("/api", "/models", "a=1&b=%20c") == "/api/models?a=1&b=%20c"
    assert request_target("", "/a b", "q=x y&r=\u00e9") == "/a%20b?q=x y&r=\u00e9"
    assert request_target("", "/m", "") == "/m"


# -- the same cases on uvloop

_ASYNC_CASES = [
    f
    for name, f in list(globals().items())
    if name.startswith("test_") and inspect.iscoroutinefunction(f)
]


@pytest.mark.parametrize("case", _ASYNC_CASES, ids=lambda f: f.__name__)
def test_on_uvloop(case: Callable[[], Coroutine[Any, Any, None]]) -> None:
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(case())
