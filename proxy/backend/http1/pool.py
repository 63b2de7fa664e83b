"""The pool of connections to one backend, and the answers it hands out.

A proxy asks little of its client: one request on a kept-alive connection, the
status and headers, then the body as it arrives. This client does only that, in one
`transport.write` per request and with no per-request objects beyond the answer, so
that a request the middlewares leave alone costs close to a bare socket relay.

- `Pool`: the connections to one origin (http or https), at most `limit` at a time
  (a request that finds them all in use waits for one at most `pool_timeout`
  seconds, then gets `PoolFull`); idle ones are reused newest first and dropped after `idle_seconds` or as soon as
  the backend closes them.
- `Response`: status, headers (lower-case names), `read_chunk()` for the body as it
  comes (Content-Length, chunked, or until the backend closes), `read()` for the
  rest, `release()` to give the connection back (closed when the body was not read
  to its end, which tells the backend to stop generating).

A connection goes back to the pool only when its request went out whole (nothing
left in the transport's write buffer) and its answer was read to its end, with no
byte past it: a backend that answers early (a 413 after the head of a large body)
would otherwise read the rest of that body as the next client's request.

Errors (proxy.backend.base): `OSError` when connecting fails, `TimeoutError` past a
deadline (`ConnectTimeout` when no connection could be had, `PoolFull` when every
place stayed taken), `Disconnected` when
the backend closes before the first byte of its answer (its `reused` says whether
the connection came from the idle pool: on a reused connection most often one the
backend had just closed as idle), `ResponseError` for an answer that is not
HTTP/1.x, whose head holds a control character or a malformed line, or that ends
before its announced end, and `BodyTooLarge` from `read()` past its `limit`.
"""

from __future__ import annotations

import asyncio
import math
import ssl as ssl_module
import time
from collections import deque

from proxy.backend.base import BodyTooLarge, ClientError, ConnectTimeout, PoolFull
from proxy.backend.http1.connection import _Conn, _expire
from proxy.backend.http1.parser import _DONE, _HEAD, _LENGTH

# the precision of a body read's timeout: waits whose deadlines fall this close
# together end at the same time
SWEEP_GRAIN = 0.01


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
            # the wait of `_Conn._wait`, written out: a stream waits here between its
            # events, and a coroutine of its own would be alive all that time; its
            # deadline is kept by the pool's one timer, not a timer of its own
            if c._error is not None:
                raise c._error
            pool = c.pool
            waiter = pool.loop.create_future()
            c._waiter = waiter
            pool._watch(c, timeout)
            try:
                await waiter
            finally:
                c._waiter = None
                pool._watched.discard(c)
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
    """Connections to one origin, at most `limit` open at a time; an idle one is
    dropped after `idle_seconds`."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int | None,
        *,
        limit: int = 100,
        connect_timeout: float = 5.0,
        pool_timeout: float = 10.0,
        idle_seconds: float = 15.0,
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
        self.pool_timeout = pool_timeout  # the longest wait for a place
        self.idle_seconds = idle_seconds  # an idle connection is closed after this
        self._idle: list[_Conn] = []
        self._busy = 0  # connections handed out or being opened
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        # the connections whose body read waits, and the one timer that ends the waits
        # past their deadline (a timer armed and cancelled for every event of every
        # stream would cost 0.5 KiB a stream and a heap push an event)
        self._watched: set[_Conn] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_at = math.inf

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
        except ConnectTimeout:
            raise
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
        the queue, never to a request that arrives meanwhile; one that waits
        `pool_timeout` seconds (or to its deadline) gets `PoolFull`."""
        if self._busy >= self.limit or self._waiters:
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            start = self.loop.time()
            timer = self.loop.call_at(min(deadline, start + self.pool_timeout), _expire, waiter)
            try:
                await waiter  # once woken, a place is held for this request
            except TimeoutError:
                raise PoolFull(self.limit, self.loop.time() - start) from None
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
                if time.monotonic() - conn.idle_since > self.idle_seconds:
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

    def _watch(self, conn: _Conn, timeout: float) -> None:
        deadline = self.loop.time() + timeout
        conn._deadline = deadline
        self._watched.add(conn)
        if deadline < self._sweep_at:
            self._arm(deadline)

    def _arm(self, when: float) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_at = when
        self._sweep = self.loop.call_at(when, self._expire_waits)

    def _expire_waits(self) -> None:
        """End the waits past their deadline; armed again for the next deadline."""
        self._sweep = None
        self._sweep_at = math.inf
        now = self.loop.time()
        nearest = math.inf
        for conn in list(self._watched):
            if conn._deadline <= now:
                self._watched.discard(conn)
                if conn._waiter is not None:
                    _expire(conn._waiter)
            elif conn._deadline < nearest:
                nearest = conn._deadline
        if nearest < math.inf:
            # deadlines that close together are ended together
            self._arm(max(nearest, now + SWEEP_GRAIN))

    def _expire_idle(self) -> None:
        # the oldest idle connections sit at the bottom of the stack
        idle = self._idle
        if idle and time.monotonic() - idle[0].idle_since > self.idle_seconds:
            now = time.monotonic()
            keep: list[_Conn] = []
            for c in idle:
                if now - c.idle_since <= self.idle_seconds and not c.closed:
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
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ClientError("the connection pool is closed"))
        self._waiters.clear()
