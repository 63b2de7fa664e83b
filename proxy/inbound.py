"""The client side of a connection: how long a client may hold the proxy, and reading
a request body within its limits.

`server.timeouts` (`ClientTimeouts`) bounds what a client can hold:

- `header`: the request head must arrive within this, counted from the connection's
  opening or, on a kept-alive connection, from the first byte of the next request;
  else a 408 in the OpenAI shape and the connection closes;
- `body`: the longest pause between two reads of a request body (`read_body`); else a
  408 and the connection closes;
- `keepalive`: an idle kept-alive connection is closed after this (aiohttp's own
  keep-alive timer);
- `send`: a client that takes nothing of a response for this long (the socket's send
  buffer full, so the proxy's writes stop draining) is dropped: the transport is
  aborted, aiohttp cancels the handler, and the handler closes its backend request,
  which frees its place in the backend pool.

`ClientConnection` (an aiohttp `RequestHandler`) keeps the header and send deadlines
with plain loop timers armed only when a deadline starts (a connection opens, the
first byte of a head arrives, the transport pauses writing), never per write or per
read. `LimitedRunner` is the `web.AppRunner` that serves its connections with it.

A connection beyond `max_connections` (what the open-file limit allows) is answered
by proxy/capacity.py's `Refuser` instead: a 503 `too_many_connections`, then closed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from proxy.capacity import Refuser
from proxy.config import ClientTimeouts
from proxy.errors import ProxyError

log = logging.getLogger("chat_proxy.inbound")


def _too_large(limit: int) -> ProxyError:
    return ProxyError(
        413, f"The request body is larger than {limit} bytes.", code="request_too_large"
    )


def request_timeout(message: str) -> ProxyError:
    """A 408 in the OpenAI shape; the connection closes after it."""
    return ProxyError(408, message, code="request_timeout", headers={"Connection": "close"})


def _raw_408(message: str) -> bytes:
    """A whole 408 response, for a connection that has no request to answer through."""
    body = request_timeout(message).to_bytes()
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class ClientConnection(RequestHandler):
    """aiohttp's HTTP/1.1 connection, with a deadline for each request head and a
    watchdog on a client that stops taking its response."""

    __slots__ = (
        "_body",
        "_head_started",
        "_head_timer",
        "_header_timeout",
        "_send_buffered",
        "_send_timeout",
        "_send_timer",
    )

    def __init__(
        self, manager: Server, *, header_timeout: float, send_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._send_timeout = send_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started: float | None = None  # when the head now due began
        self._send_timer: asyncio.TimerHandle | None = None
        self._send_buffered = 0
        # the body of the last request head parsed (None: no head yet); the next byte
        # that arrives once it is complete starts the next head
        self._body: StreamReader | None = None

    @property
    def header_timeout(self) -> float:
        return self._header_timeout

    @property
    def send_timeout(self) -> float:
        return self._send_timeout

    # -- the request head --

    # The deadline of a head is kept as its start time, read by one timer per
    # connection that re-arms itself only while a head is due: a kept-alive
    # connection's requests cost no timer of their own (a timer armed and cancelled
    # per request costs about 4% of a relayed request).

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._head_started = self._loop.time()
        self._head_timer = self._loop.call_later(self._header_timeout, self._check_head)

    def data_received(self, data: bytes) -> None:
        if (
            self._head_started is None
            and (self._body is None or self._body.is_eof())
            and data
            and not (self._close or self._force_close or self._upgraded)
        ):
            # the first byte of the next request: its head has `header` seconds
            self._head_started = self._loop.time()
            if self._head_timer is None:
                self._head_timer = self._loop.call_later(self._header_timeout, self._check_head)
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            self._head_started = None
            if self._messages:
                self._body = self._messages[-1][1]

    def _process_keepalive(self) -> None:
        if self._head_started is not None:
            # a head is arriving: the connection is not idle, its deadline governs
            self._keepalive_handle = None
            return
        super()._process_keepalive()

    def _check_head(self) -> None:
        self._head_timer = None
        started = self._head_started
        if started is None:
            return
        due = started + self._header_timeout
        if self._loop.time() < due:
            self._head_timer = self._loop.call_at(due, self._check_head)
            return
        self._head_expired()

    def _head_expired(self) -> None:
        self._head_started = None
        transport = self.transport
        if transport is None or self._force_close:
            return
        log.debug(
            "request head timeout: connection closed",
            extra={"peer": self.peername, "timeout": self._header_timeout},
        )
        waiter = self._waiter
        if waiter is None or waiter.done():
            # a pipelined head behind a request still being answered: end the connection
            # once that answer is out, with nothing more read
            self.close()
            return
        transport.write(
            _raw_408(f"The request head did not arrive within {self._header_timeout:g} seconds.")
        )
        self.force_close()  # the transport sends what it holds, then closes

    def streaming(self) -> None:
        """A response that may last (an event stream) has started: the timers armed
        for a connection that is idle or receiving a head are not needed until it
        ends, so they are cancelled rather than left holding memory for the stream's
        life (with uvloop about 530 bytes each). aiohttp arms its keep-alive timer
        again once the response is out; the next head's first byte arms the head
        timer again."""
        if self._head_started is None and self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        keepalive = self._keepalive_handle
        if keepalive is not None:
            keepalive.cancel()
            self._keepalive_handle = None

    def abandon_body(self) -> None:
        """The rest of this request's body will not be read: close the connection once
        the answer is out rather than wait (aiohttp's lingering) for bytes that stopped
        coming."""
        self._lingering_time = 0.0

    # -- the response --

    def pause_writing(self) -> None:
        super().pause_writing()
        transport = self.transport
        if transport is not None and self._send_timer is None:
            self._send_buffered = transport.get_write_buffer_size()
            self._send_timer = self._loop.call_later(self._send_timeout, self._send_expired)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_expired(self) -> None:
        self._send_timer = None
        transport = self.transport
        if transport is None or not self._paused:
            return
        buffered = transport.get_write_buffer_size()
        if buffered < self._send_buffered:
            # the client took some, too slowly to drain the buffer: another period
            self._send_buffered = buffered
            self._send_timer = self._loop.call_later(self._send_timeout, self._send_expired)
            return
        log.info(
            "client took nothing of its response: dropped",
            extra={"peer": self.peername, "timeout": self._send_timeout, "buffered": buffered},
        )
        # connection_lost follows: aiohttp cancels the handler, which closes its backend
        # request
        transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        for timer in (self._head_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._send_timer = None
        self._body = None
        super().connection_lost(exc)


class LimitedServer(Server):
    """aiohttp's low-level server, whose connections are `ClientConnection`s, at most
    `max_connections` of them at once (None: no limit of its own)."""

    def __init__(
        self,
        handler: Any,
        *,
        timeouts: ClientTimeouts,
        max_connections: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.timeouts = timeouts
        self.refuser = Refuser(max_connections) if max_connections is not None else None

    def __call__(self) -> RequestHandler:
        refuser = self.refuser
        if refuser is not None and len(self._connections) >= refuser.limit:
            # the loop takes any protocol; aiohttp's annotation names its own
            return refuser.refuse()  # type: ignore[return-value]
        return ClientConnection(
            self,
            header_timeout=self.timeouts.header,
            send_timeout=self.timeouts.send,
            loop=self._loop,
            **self._kwargs,
        )


class LimitedRunner(web.AppRunner):
    """`web.AppRunner` for the proxy: `timeouts` bound what each client connection may
    hold, and a handler is cancelled when its client goes (`handler_cancellation`)."""

    __slots__ = ("_max_connections", "_timeouts")

    def __init__(
        self,
        app: web.Application,
        timeouts: ClientTimeouts,
        *,
        max_connections: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("handler_cancellation", True)
        kwargs.setdefault("keepalive_timeout", timeouts.keepalive)
        super().__init__(app, **kwargs)
        self._timeouts = timeouts
        self._max_connections = max_connections

    async def _make_server(self) -> Server:
        base = await super()._make_server()  # runs the application's startup
        return LimitedServer(
            base.request_handler,
            timeouts=self._timeouts,
            max_connections=self._max_connections,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            **base._kwargs,
        )


async def read_body(request: web.Request, limit: int, pause: float) -> bytes:
    """The request body, at most `limit` bytes (413 past it); `pause` is the longest
    wait allowed between two reads (408 past it). What has already arrived is taken
    without a wait, so a timer is started only for a read that has to wait."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    content = request.content
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = content.read_nowait()
        if not chunk:
            if content.is_eof():
                break
            try:
                async with asyncio.timeout(pause):
                    chunk = await content.readany()
            except TimeoutError:
                protocol = request.protocol
                if isinstance(protocol, ClientConnection):
                    protocol.abandon_body()
                raise request_timeout(
                    f"The request body paused for more than {pause:g} seconds."
                ) from None
            if not chunk:
                break
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)
