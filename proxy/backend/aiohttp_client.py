"""A backend client over aiohttp.ClientSession, the alternative to `proxy.backend.http1`.

One session per upstream, on a `TCPConnector(limit=max_connections)` whose idle
connections are kept `idle_seconds`. Bytes are relayed as they came: no automatic
decompression, no added Accept, Accept-Encoding, User-Agent or Content-Type, no
cookie jar (a backend's cookies would otherwise go out with other clients'
requests), no redirects followed.

aiohttp's errors are mapped onto those of `proxy.backend.base`, so that the proxy
handles both clients alike:

- connecting fails: the `OSError` under aiohttp's `ClientConnectorError` (an
  `ssl.SSLError` for a certificate that does not verify);
- a deadline passes: `PoolFull` when every place stayed taken for `pool_timeout`
  seconds (the wait in aiohttp's queue, seen through its trace), `ConnectTimeout`
  when connecting was too slow, else `TimeoutError`;
- the backend closes (or resets) the connection before the status line:
  `Disconnected`, `reused` from aiohttp's trace of the request (whether the
  connection came from the idle ones);
- a malformed head, or a body that ends before its end: `ResponseError`;
- `read(limit=...)` past the limit: `BodyTooLarge`.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from types import SimpleNamespace

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.backend.base import (
    BodyTooLarge,
    ClientError,
    ConnectTimeout,
    Disconnected,
    PoolFull,
    ResponseError,
)

__all__ = ["AiohttpClient", "AiohttpResponse"]

MAX_HEAD = 64 * 1024  # the longest status line or header line, as http1 allows for a head

# headers aiohttp would add of itself; the proxy sends what it means to send
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


class _Attempt:
    """What aiohttp's trace says of one request's connection."""

    __slots__ = ("connected", "deadline", "pool_timeout", "queued", "reused", "timer")

    def __init__(self, deadline: float, pool_timeout: float) -> None:
        self.connected = False  # a connection was had (opened or taken from the idle ones)
        self.reused = False  # taken from the idle ones
        self.queued = 0.0  # when it began to wait for a place, while it waits
        self.timer: asyncio.Timeout | None = None  # the request's, moved while it queues
        self.deadline = deadline
        self.pool_timeout = pool_timeout


async def _queued(session: aiohttp.ClientSession, ctx: SimpleNamespace, params: object) -> None:
    attempt = ctx.trace_request_ctx
    if isinstance(attempt, _Attempt) and attempt.timer is not None:
        attempt.queued = now = asyncio.get_running_loop().time()
        attempt.timer.reschedule(min(attempt.deadline, now + attempt.pool_timeout))


async def _dequeued(session: aiohttp.ClientSession, ctx: SimpleNamespace, params: object) -> None:
    attempt = ctx.trace_request_ctx
    if isinstance(attempt, _Attempt) and attempt.timer is not None:
        attempt.queued = 0.0
        attempt.timer.reschedule(attempt.deadline)


async def _created(session: aiohttp.ClientSession, ctx: SimpleNamespace, params: object) -> None:
    attempt = ctx.trace_request_ctx
    if isinstance(attempt, _Attempt):
        attempt.connected = True


async def _reused(session: aiohttp.ClientSession, ctx: SimpleNamespace, params: object) -> None:
    attempt = ctx.trace_request_ctx
    if isinstance(attempt, _Attempt):
        attempt.connected = True
        attempt.reused = True


class AiohttpResponse:
    """The answer to one request (see `proxy.backend.base.BackendResponse`)."""

    __slots__ = ("_done", "_resp", "_taken", "headers", "reason", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self._done = False
        self._taken = 0  # body bytes handed out
        self.status = resp.status
        self.reason = resp.reason or ""
        headers: dict[str, str] = {}
        for name, value in resp.headers.items():
            key = name.lower()
            if key in headers:
                headers[key] += ", " + value
            else:
                headers[key] = value
        self.headers = headers

    @property
    def complete(self) -> bool:
        """The whole body has arrived and been read."""
        return self._resp.content.at_eof()

    async def read_chunk(self, timeout: float) -> bytes:
        """The body bytes received since the last call (waiting up to `timeout`
        seconds for some); b"" at the end of the body."""
        if self._done:
            return b""
        content = self._resp.content
        try:
            async with asyncio.timeout(timeout):
                data = await content.readany()
            if data and not content.at_eof():
                more = content.read_nowait(-1)  # what else is buffered, in one piece
                if more:
                    data += more
        except TimeoutError:
            raise TimeoutError() from None
        except aiohttp.ClientPayloadError as exc:
            raise ResponseError(f"the backend's answer is malformed or cut short ({exc})") from None
        except aiohttp.ClientError as exc:
            raise ResponseError(f"the backend closed the connection early ({exc})") from None
        self._taken += len(data)
        return data

    async def read(self, timeout: float, limit: int | None = None) -> bytes:
        """The rest of the body, each wait for more bytes up to `timeout` seconds.

        With `limit`, a body longer than `limit` bytes raises `BodyTooLarge` and
        closes the connection (at once when its Content-Length says so)."""
        if limit is not None:
            length = self._resp.content_length
            if length is not None and length - self._taken > limit:
                self.close()
                raise BodyTooLarge(limit)
        parts: list[bytes] = []
        size = 0
        while chunk := await self.read_chunk(timeout):
            size += len(chunk)
            if limit is not None and size > limit:
                self.close()
                raise BodyTooLarge(limit)
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Done with the answer: the connection goes back to the pool when the body
        was read to its end, and is closed otherwise."""
        if self._done:
            return
        self._done = True
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()

    def close(self) -> None:
        """Close the connection whatever was read (the backend sees the client go)."""
        if self._done:
            return
        self._done = True
        self._resp.close()


class AiohttpClient:
    """The connections to one origin over one aiohttp session, at most `limit` open
    at a time; an idle one is dropped after `idle_seconds`."""

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
        self.limit = limit
        self.pool_timeout = pool_timeout
        tls = scheme == "https"
        self._origin = str(URL.build(scheme=scheme, host=host, port=port or (443 if tls else 80)))
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(_created)
        trace.on_connection_reuseconn.append(_reused)
        trace.on_connection_queued_start.append(_queued)
        trace.on_connection_queued_end.append(_dequeued)
        self._connector = aiohttp.TCPConnector(
            limit=limit,
            limit_per_host=0,
            keepalive_timeout=idle_seconds,
            ssl=ssl_context if tls and ssl_context is not None else True,
        )
        self._session = aiohttp.ClientSession(
            connector=self._connector,
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
            # the caller's `timeout` bounds each request; aiohttp bounds only connecting
            timeout=aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=connect_timeout, sock_read=None
            ),
            trace_configs=[trace],
            max_line_size=MAX_HEAD,
            max_field_size=MAX_HEAD,
        )
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Connections in use and idle (aiohttp has no public count: its connector's
        own bookkeeping)."""
        c = self._connector
        acquired = getattr(c, "_acquired", ())
        idle = getattr(c, "_conns", {})
        return len(acquired) + sum(len(conns) for conns in idle.values())

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        *,
        timeout: float,
    ) -> AiohttpResponse:
        """Send a request; return once the status line and headers have arrived
        (within `timeout` seconds of the call, connecting included)."""
        if self._closed:
            raise ClientError("the connection pool is closed")
        for name, value in headers:
            if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
                raise ValueError("a header name or value contains a line break")
        deadline = self.loop.time() + timeout
        attempt = _Attempt(deadline, self.pool_timeout)
        try:
            async with asyncio.timeout_at(deadline) as attempt.timer:
                resp = await self._session.request(
                    method,
                    URL(self._origin + target, encoded=True),
                    headers=CIMultiDict(headers),
                    data=body,
                    allow_redirects=False,
                    trace_request_ctx=attempt,
                )
        except TimeoutError:
            # also aiohttp's ServerTimeoutError (connecting took sock_connect seconds)
            if attempt.queued:
                raise PoolFull(self.limit, self.loop.time() - attempt.queued) from None
            raise (ConnectTimeout() if not attempt.connected else TimeoutError()) from None
        except aiohttp.ClientConnectorError as exc:
            raise exc.os_error from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise Disconnected(
                f"the backend closed the connection ({exc})", reused=attempt.reused
            ) from None
        except (aiohttp.ClientResponseError, aiohttp.ClientPayloadError) as exc:
            raise ResponseError(f"the backend's answer is not valid HTTP/1.x ({exc})") from None
        except aiohttp.ClientError as exc:
            raise ClientError(str(exc)) from None
        if resp.status == 101:  # this client never asks for an upgrade
            resp.close()
            raise ResponseError("the backend switched protocols unasked")
        return AiohttpResponse(resp)

    async def close(self) -> None:
        self._closed = True
        await self._session.close()
