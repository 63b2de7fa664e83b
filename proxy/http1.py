"""The HTTP/1.1 client that talks to the backends.

A proxy asks little of its client: one request on a kept-alive connection, the
status and headers, then the body as it arrives. This client does only that, in one
`transport.write` per request and with no per-request objects beyond the answer, so
that a request the middlewares leave alone costs close to a bare socket relay.

- `Pool`: the connections to one origin (http or https), at most `limit` at a time;
  idle ones are reused newest first and dropped after `keepalive` seconds or as soon
  as the backend closes them.
- `Response`: status, headers (lower-case names), `read_chunk()` for the body as it
  comes (Content-Length, chunked, or until the backend closes), `read()` for the
  rest, `release()` to give the connection back (closed when the body was not read
  to its end, which tells the backend to stop generating).

A connection goes back to the pool only when its request went out whole (nothing
left in the transport's write buffer) and its answer was read to its end, with no
byte past it: a backend that answers early (a 413 after the head of a large body)
would otherwise read the rest of that body as the next client's request.

Errors: `OSError` when connecting fails, `TimeoutError` past a deadline,
`Disconnected` when the backend closes before the first byte of its answer (its
`reused` says whether the connection came from the idle pool: on a reused
connection most often one the backend had just closed as idle), `ResponseError` for
an answer that is not HTTP/1.x, whose head holds a control character or a malformed
line, or that ends before its announced end, and `BodyTooLarge` from `read()` past
its `limit`.
"""

from __future__ import annotations

import asyncio
import re
import ssl as ssl_module
import time
from collections import deque
from typing import cast
from urllib.parse import quote

__all__ = [
    "BodyTooLarge",
    "ClientError",
    "ConnectTimeout",
    "Disconnected",
    "Pool",
    "Response",
    "ResponseError",
]

MAX_HEAD = 64 * 1024  # status line and headers
MAX_CHUNK_LINE = 4096
HIGH_WATER = 1024 * 1024  # body bytes buffered before the backend is paused

_SAFE_TARGET = re.compile(r"[!$&'()*+,\-./0-9:;=@A-Z_a-z~]*")

# RFC 9110 5.1 and 5.5: a field name is a token; a value holds visible characters,
# obs-text, spaces and tabs, and no other control character (CR, LF, NUL...). A
# line ends in CRLF or, as RFC 9112 2.2 allows, in a bare LF; a CR anywhere else is
# refused, and so is obs-fold (a line that starts with a space or a tab).
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TEXT = r"[\t\x20-\x7e\x80-\xff]*"
# the whole head, decoded as latin-1, less its blank line: the status line (a reason
# phrase may be left out) then the header lines
_HEAD_RE = re.compile(rf"HTTP/1\.([0-9]) ([0-9]{{3}})(?: {_TEXT})?(?:\r?\n{_TOKEN}:{_TEXT})*")
# the trailer section of a chunked body, each line with its end
_TRAILERS_RE = re.compile(rf"(?:{_TOKEN}:{_TEXT}\r?\n)*".encode("latin-1"))
# a chunk size line less its CRLF: the size, then (after optional blanks, RFC 9112
# 7.1.1) extensions, which are not parsed but may hold no control character
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[\t\x20-\x7e\x80-\xff]*)?[ \t]*")

# states of the body parser
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class ClientError(Exception):
    """A backend exchange that failed after the connection was made."""


class Disconnected(ClientError):
    """The backend closed the connection before the first byte of its answer.

    `reused` is True when the connection came from the pool's idle ones (the backend
    may have closed it as idle just as the request went out: the request surely never
    reached it), False on a fresh connection (which did take the request)."""

    def __init__(
        self,
        message: str = "the backend closed the connection",
        *,
        reused: bool = False,
        sent: bool = True,
    ) -> None:
        super().__init__(message)
        self.reused = reused
        self.sent = sent  # False: lost before the request was handed to the transport


class ConnectTimeout(TimeoutError):
    """No connection could be had within the deadline (every place in the pool was
    taken, or connecting took too long): the request was never sent."""


class ResponseError(ClientError):
    """The backend's answer is not valid HTTP/1.x, or ended before its end."""


class BodyTooLarge(ClientError):
    """`Response.read(limit=...)`: the body is larger than `limit` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the backend's answer is larger than {limit} bytes")
        self.limit = limit


def request_target(base_path: str, path: str, raw_query: str) -> str:
    """The request-target: the upstream's base path, the path (percent-encoded
    where needed) and the client's query as it came."""
    if not _SAFE_TARGET.fullmatch(path):
        path = quote(path, safe="/:@!$&'()*+,;=-._~")
    target = base_path + path
    return target + "?" + raw_query if raw_query else target


class _Conn(asyncio.Protocol):
    """One connection; it carries one exchange at a time."""

    __slots__ = (
        "_body",
        "_buffered",
        "_cbuf",
        "_error",
        "_expect_body",
        "_head",
        "_keep_alive",
        "_paused",
        "_remaining",
        "_sent",
        "_state",
        "_waiter",
        "closed",
        "headers",
        "idle_since",
        "pool",
        "reason",
        "reused",
        "status",
        "transport",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.closed = False
        self.reused = False  # taken from the idle connections rather than opened
        self._reset()

    def _reset(self) -> None:
        self._state = _HEAD
        self._head = b""
        self._remaining = 0
        self._cbuf = b""
        self._body: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._keep_alive = True
        self._expect_body = True
        self._sent = False  # the request has been handed to the transport
        self.status = 0
        self.reason = ""
        self.headers: dict[str, str] = {}

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self.idle_since or not self._sent:  # bytes nobody asked for
            self._fail(ResponseError("unexpected bytes on an idle connection"))
            return
        try:
            if self._state == _HEAD:
                data = self._parse_head(data)
                if self._state == _HEAD:
                    return
                self._wake()
            if data:
                self._feed_body(data)
        except ResponseError as exc:
            self._fail(exc)

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost says what it meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.idle_since:
            self.pool._forget(self)
            return
        if self._error is not None:
            return
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
            self._keep_alive = False
            self._wake()
        elif self._state == _HEAD and not self._head:
            self._set_error(Disconnected(reused=self.reused, sent=self._sent))
        elif self._state != _DONE:
            self._set_error(ResponseError("the backend closed the connection early"))

    # -- parsing

    def _parse_head(self, data: bytes) -> bytes:
        head = self._head + data if self._head else data
        while True:
            # the head ends at the first empty line: "\n\r\n" (in CRLFCRLF) or "\n\n"
            # (a line may end in a bare LF, RFC 9112 2.2; some small servers)
            lf = head.find(b"\n\r\n")
            bare = head.find(b"\n\n", 0, lf + 1 if lf >= 0 else len(head))
            if bare >= 0:
                lf, skip = bare, 2
            else:
                skip = 3
            if lf < 0:
                if len(head) > MAX_HEAD:
                    raise ResponseError("the response headers are too long")
                if not head.startswith(b"HTTP/") and not b"HTTP/".startswith(head):
                    raise ResponseError("the backend's answer is not HTTP/1.x")
                self._head = head
                return b""
            if lf > MAX_HEAD:
                raise ResponseError("the response headers are too long")
            stop = lf - 1 if lf and head[lf - 1] == 13 else lf  # less the CR of its CRLF
            text = head[:stop].decode("latin-1")
            head = head[lf + skip :]
            match = _HEAD_RE.fullmatch(text)
            if match is None:
                raise ResponseError(_head_fault(text))
            status = int(match[2])
            if status < 100:
                raise ResponseError("the backend's status code is out of range")
            # the pattern leaves a CR only at the end of a line, after the colon of a
            # header line: stripped from the value with the blanks
            lines = text.split("\n")
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                key = name.lower()
                value = value.strip(" \t\r")
                if key in headers:
                    headers[key] += ", " + value
                else:
                    headers[key] = value
            te = headers.get("transfer-encoding")
            # only chunked: a body in any other coding could not be passed on as is
            if te is not None and te.lower() != "chunked":
                raise ResponseError("the backend's transfer-encoding is not supported")
            length = headers.get("content-length")
            if length is not None and not (
                length.isascii() and length.isdigit() and len(length) < 19
            ):
                headers["content-length"] = _one_length(length)
            if status < 200:
                if status == 101:  # this client never asks for an upgrade
                    raise ResponseError("the backend switched protocols unasked")
                continue  # 100 Continue and other interim answers
            self.status = status
            status_line = lines[0].rstrip("\r")
            self.reason = status_line[13:] if len(status_line) > 12 else ""
            self.headers = headers
            self._head = b""
            connection = headers.get("connection")
            if connection is not None:
                connection = connection.lower()
                if connection != "keep-alive":  # else kept alive, in 1.0 as in 1.1
                    tokens = {t.strip(" \t") for t in connection.split(",")}
                    if "close" in tokens or (match[1] == "0" and "keep-alive" not in tokens):
                        self._keep_alive = False
            elif match[1] == "0":  # HTTP/1.0: closed after the answer unless kept alive
                self._keep_alive = False
            self._frame(headers)
            return head

    def _frame(self, headers: dict[str, str]) -> None:
        """The body's framing, from headers `_parse_head` has checked."""
        if not self._expect_body or self.status in (204, 304):
            self._state = _DONE
            return
        if "transfer-encoding" in headers:
            if "content-length" in headers:
                # RFC 9112 6.3: chunked wins, but such an answer smells of smuggling;
                # the connection is not trusted with another request
                self._keep_alive = False
            self._state = _CHUNK_SIZE
            return
        length = headers.get("content-length")
        if length is not None:
            self._remaining = int(length)
            self._state = _LENGTH if self._remaining else _DONE
            return
        self._state = _UNTIL_CLOSE
        self._keep_alive = False

    def _feed_body(self, data: bytes) -> None:
        state = self._state
        if state == _LENGTH:
            n = len(data)
            if n >= self._remaining:
                if n > self._remaining:
                    data = data[: self._remaining]
                    self._keep_alive = False
                self._remaining = 0
                self._state = _DONE
            else:
                self._remaining -= n
            self._push(data)
        elif state == _UNTIL_CLOSE:
            self._push(data)
        elif state == _DONE:
            self._keep_alive = False  # bytes past the end: do not trust this connection
        else:
            self._dechunk(data)

    def _dechunk(self, data: bytes) -> None:
        buf = self._cbuf + data if self._cbuf else data
        pos = 0
        n = len(buf)
        out: list[bytes] = []
        state = self._state
        while pos < n:
            if state == _CHUNK_DATA:
                take = min(self._remaining, n - pos)
                out.append(buf[pos : pos + take] if take < n or pos else buf)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if n - pos < 2:
                    if buf[pos] != 13:  # not even the CR: no need to wait for the LF
                        raise ResponseError("a chunk of the backend's answer is malformed")
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ResponseError("a chunk of the backend's answer is malformed")
                pos += 2
                state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > MAX_CHUNK_LINE:
                        raise ResponseError("a chunk size line is too long")
                    break
                line = _CHUNK_LINE.fullmatch(buf, pos, eol)
                if line is None:
                    raise ResponseError("a chunk size of the backend's answer is malformed")
                self._remaining = int(line[1], 16)
                pos = eol + 2
                state = _CHUNK_DATA if self._remaining else _TRAILERS
            elif state == _TRAILERS:
                # header lines (dropped, but checked as a head's are) to an empty line
                if buf.startswith(b"\r\n", pos):
                    pos += 2
                elif buf.startswith(b"\n", pos):
                    pos += 1
                else:
                    lf = buf.find(b"\n\r\n", pos)
                    bare = buf.find(b"\n\n", pos, lf + 1 if lf >= 0 else n)
                    if bare >= 0:
                        lf, skip = bare, 2
                    else:
                        skip = 3
                    if lf < 0:
                        if n - pos > MAX_HEAD:
                            raise ResponseError("the response trailers are too long")
                        break
                    if _TRAILERS_RE.fullmatch(buf, pos, lf + 1) is None:
                        raise ResponseError("a response trailer line is malformed")
                    pos = lf + skip
                state = _DONE
                if pos < n:
                    self._keep_alive = False
                break
            else:
                break
        self._state = state
        self._cbuf = buf[pos:] if state != _DONE and pos < n else b""
        if out:
            self._push(out[0] if len(out) == 1 else b"".join(out))
        elif state == _DONE:
            self._wake()

    def _push(self, data: bytes) -> None:
        if data:
            self._body.append(data)
            self._buffered += len(data)
            if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _set_error(self, exc: BaseException) -> None:
        self._error = exc
        self._keep_alive = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _fail(self, exc: BaseException) -> None:
        self._set_error(exc)
        self.close()

    # -- used by Pool and Response

    async def _wait(self, timeout: float) -> None:
        if self._error is not None:
            raise self._error
        loop = self.pool.loop
        waiter = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def reusable(self) -> bool:
        """Whether the connection may carry another request: its answer was read to
        its end, with no byte past it, and its request went out whole (an answer can
        come before the backend has read the whole request, and what is left of the
        request would reach the backend ahead of the next one)."""
        t = self.transport
        return (
            self._state == _DONE
            and not self._body
            and self._keep_alive
            and not self.closed
            and t is not None
            and not t.get_write_buffer_size()
        )

    def close(self) -> None:
        self.closed = True
        t = self.transport
        if t is not None:
            if t.get_write_buffer_size():
                t.abort()  # close() would send the rest of the request first
            else:
                t.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_STATUS = re.compile(r"HTTP/1\.[0-9] ")
_CODE = re.compile(r"HTTP/1\.[0-9] [0-9]{3}(?:[ \r\n]|$)")


def _head_fault(text: str) -> str:
    """Why a head that `_HEAD_RE` refused is wrong (off the fast path)."""
    if not _STATUS.match(text):
        return "the backend's answer is not HTTP/1.x"
    if not _CODE.match(text):
        return "the backend's status code is not three digits"
    if _CONTROL.search(text.replace("\r\n", "").replace("\n", "")):
        return "a response header holds a control character"
    return "a response header line is malformed"


def _one_length(value: str) -> str:
    """A Content-Length other than plain digits: one value repeated ("5, 5", or the
    field sent twice; RFC 9110 8.6 lets a recipient take it as one) is that value;
    anything else is an error."""
    values = {v.strip(" \t") for v in value.split(",")}
    if len(values) != 1:
        raise ResponseError("the backend's content-length values conflict")
    length = values.pop()
    if not (length.isascii() and length.isdigit()):
        raise ResponseError("the backend's content-length is not a number")
    if len(length) > 18:
        raise ResponseError("the backend's content-length is too large")
    return length


class Response:
    """The answer to one request; the connection is the pool's again after
    `release()` or `close()`."""

    __slots__ = ("_conn", "_done", "headers", "reason", "status")

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self.status = conn.status
        self.reason = conn.reason
        self.headers = conn.headers
        self._done = False

    @property
    def complete(self) -> bool:
        """The whole body has arrived and been read."""
        c = self._conn
        return c._state == _DONE and not c._body

    async def read_chunk(self, timeout: float) -> bytes:
        """The body bytes received since the last call (waiting up to `timeout`
        seconds for some); b"" at the end of the body."""
        c = self._conn
        if self._done:
            return b""
        while not c._body:
            if c._state == _DONE:
                return b""
            await c._wait(timeout)
        body = c._body
        data = body[0] if len(body) == 1 else b"".join(body)
        c._body = []
        c._buffered = 0
        if c._paused and c.transport is not None:
            c._paused = False
            c.transport.resume_reading()
        return data

    async def read(self, timeout: float, limit: int | None = None) -> bytes:
        """The rest of the body, each wait for more bytes up to `timeout` seconds.

        With `limit`, a body longer than `limit` bytes raises `BodyTooLarge` and
        closes the connection (at once when its Content-Length says so)."""
        parts: list[bytes] = []
        if limit is None:
            while True:
                chunk = await self.read_chunk(timeout)
                if not chunk:
                    return b"".join(parts)
                parts.append(chunk)
        c = self._conn
        size = 0
        if c._state == _LENGTH and c._remaining + c._buffered > limit:
            self.close()
            raise BodyTooLarge(limit)
        while True:
            chunk = await self.read_chunk(timeout)
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > limit:
                self.close()
                raise BodyTooLarge(limit)
            parts.append(chunk)

    def release(self) -> None:
        """Done with the answer: the connection goes back to the pool when the body
        was read to its end, and is closed otherwise."""
        if self._done:
            return
        self._done = True
        c = self._conn
        c.pool._release(c, c.reusable())

    def close(self) -> None:
        """Close the connection whatever was read (the backend sees the client go)."""
        if self._done:
            return
        self._done = True
        c = self._conn
        c.pool._release(c, False)


class Pool:
    """Connections to one origin, at most `limit` open at a time."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int | None,
        *,
        limit: int = 100,
        connect_timeout: float = 5.0,
        keepalive: float = 15.0,
        ssl_context: ssl_module.SSLContext | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.host = host
        tls = scheme == "https"
        self.port = port or (443 if tls else 80)
        self.ssl = (ssl_context or ssl_module.create_default_context()) if tls else None
        default = 443 if tls else 80
        name = f"[{host}]" if ":" in host else host
        self.host_header = name if self.port == default else f"{name}:{self.port}"
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self._idle: list[_Conn] = []
        self._busy = 0  # connections handed out or being opened
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._busy + len(self._idle)

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        *,
        timeout: float,
    ) -> Response:
        """Send a request; return once the status line and headers have arrived
        (within `timeout` seconds of the call, connecting included)."""
        if self._closed:
            raise ClientError("the connection pool is closed")
        deadline = self.loop.time() + timeout
        try:
            conn = await self._acquire(deadline)
        except TimeoutError:
            raise ConnectTimeout() from None
        try:
            lines = [f"{method} {target} HTTP/1.1", "Host: " + self.host_header]
            lines.extend(f"{k}: {v}" for k, v in headers)
            if body is not None:
                lines.append(f"Content-Length: {len(body)}")
            head = "\r\n".join(lines)
            if head.count("\r") != len(lines) - 1 or head.count("\n") != len(lines) - 1:
                raise ValueError("a header name or value contains a line break")
            data = (head + "\r\n\r\n").encode("utf-8", "surrogateescape")
            conn._expect_body = method != "HEAD"
            conn._sent = True
            assert conn.transport is not None
            conn.transport.write(data + body if body else data)
            while conn._state == _HEAD:
                remaining = deadline - self.loop.time()
                if remaining <= 0:
                    raise TimeoutError()
                await conn._wait(remaining)
        except BaseException:
            self._release(conn, False)
            raise
        return Response(conn)

    async def _acquire(self, deadline: float) -> _Conn:
        """A connection, idle or new, within one of the pool's `limit` places. When
        every place is taken the request queues; a place freed goes to the first in
        the queue, never to a request that arrives meanwhile."""
        if self._busy >= self.limit or self._waiters:
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            timer = self.loop.call_at(deadline, _expire, waiter)
            try:
                await waiter  # once woken, a place is held for this request
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    # woken, then cancelled: pass the place on
                    self._busy -= 1
                    self._wake_one()
                raise
            finally:
                timer.cancel()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        else:
            self._busy += 1
        try:
            idle = self._idle
            while idle:
                conn = idle.pop()
                if conn.closed:
                    continue
                if time.monotonic() - conn.idle_since > self.keepalive:
                    conn.close()
                    continue
                self._expire_idle()
                conn.idle_since = 0.0
                conn.reused = True
                conn._reset()
                return conn
            remaining = deadline - self.loop.time()
            async with asyncio.timeout(min(self.connect_timeout, max(remaining, 0.0))):
                _, conn = await self.loop.create_connection(
                    lambda: _Conn(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None,
                )
        except BaseException:
            self._busy -= 1
            self._wake_one()
            raise
        return conn

    def _expire_idle(self) -> None:
        # the oldest idle connections sit at the bottom of the stack
        idle = self._idle
        if idle and time.monotonic() - idle[0].idle_since > self.keepalive:
            now = time.monotonic()
            keep: list[_Conn] = []
            for c in idle:
                if now - c.idle_since <= self.keepalive and not c.closed:
                    keep.append(c)
                else:
                    c.close()
            self._idle = keep

    def _release(self, conn: _Conn, reusable: bool) -> None:
        self._busy -= 1
        if reusable and not self._closed:
            conn.idle_since = time.monotonic() or 1e-9
            self._idle.append(conn)
        else:
            conn.close()
        self._wake_one()

    def _forget(self, conn: _Conn) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def _wake_one(self) -> None:
        """Hand a free place to the first request in the queue."""
        while self._waiters and self._busy < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._busy += 1
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ClientError("the connection pool is closed"))
        self._waiters.clear()
