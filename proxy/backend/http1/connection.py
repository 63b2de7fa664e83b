"""One connection to a backend: an asyncio.Protocol that feeds the parser.

It carries one exchange at a time. Body bytes are buffered until the caller takes
them; past `HIGH_WATER` bytes the transport stops reading, so that a slow client
slows the backend down rather than filling the proxy's memory.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

from proxy.backend.base import Disconnected, ResponseError
from proxy.backend.http1.parser import _DONE, _HEAD, _UNTIL_CLOSE, ResponseParser


class Owner(Protocol):
    """What a connection needs of its pool (proxy/backend/http1/pool.py), named here so
    that the connection does not import the pool that imports it."""

    loop: asyncio.AbstractEventLoop
    _watched: set[_Conn]

    def _watch(self, conn: _Conn, timeout: float) -> None: ...

    def _forget(self, conn: _Conn) -> None: ...

    def _release(self, conn: _Conn, reusable: bool) -> None: ...


HIGH_WATER = 1024 * 1024  # body bytes buffered before the backend is paused


class _Conn(ResponseParser, asyncio.Protocol):
    """One connection; it carries one exchange at a time."""

    __slots__ = (
        "_deadline",
        "_error",
        "_paused",
        "_sent",
        "_waiter",
        "closed",
        "idle_since",
        "pool",
        "reused",
        "transport",
    )

    def __init__(self, pool: Owner) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.closed = False
        self.reused = False  # taken from the idle connections rather than opened
        self._deadline = 0.0  # while a body read waits: when it times out (Pool._watch)
        self._reset()

    def _reset(self) -> None:
        self._reset_parse()
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._sent = False  # the request has been handed to the transport

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
