"""What the proxy asks of a backend client, whichever implements it.

A client holds the connections to one upstream (`BackendClient`); each request gives
a `BackendResponse`: the status and headers once they have arrived, then the body
as it comes. Two implementations: `proxy.backend.http1.Pool` (the proxy's own
HTTP/1.1 client) and `proxy.backend.aiohttp_client.AiohttpClient`.

Errors, the same from both: `OSError` when connecting fails, `TimeoutError` past a
deadline (`ConnectTimeout` when no connection could be had in time: the request was
never sent; `PoolFull`, one of them, when every place in the pool stayed taken for
the pool's `pool_timeout`), `Disconnected` when the backend closes before the first byte of its
answer, `ResponseError` for an answer that is not valid HTTP/1.x or ends before its
end, `BodyTooLarge` from `read()` past its `limit`, and `ClientError` (their base)
for any other failure of an exchange.
"""

from __future__ import annotations

import asyncio
import re
from typing import Protocol
from urllib.parse import quote

__all__ = [
    "BackendClient",
    "BackendResponse",
    "BodyTooLarge",
    "ClientError",
    "ConnectTimeout",
    "Disconnected",
    "PoolFull",
    "ResponseError",
    "request_target",
]


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


class PoolFull(ConnectTimeout):
    """Every one of the pool's `limit` connections stayed in use for `waited`
    seconds: the request was never sent."""

    def __init__(self, limit: int, waited: float) -> None:
        super().__init__(f"all {limit} connections are in use")
        self.limit = limit
        self.waited = waited


class ResponseError(ClientError):
    """The backend's answer is not valid HTTP/1.x, or ended before its end."""


class BodyTooLarge(ClientError):
    """`BackendResponse.read(limit=...)`: the body is larger than `limit` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the backend's answer is larger than {limit} bytes")
        self.limit = limit


class BackendResponse(Protocol):
    """The answer to one request; its connection is the client's again after
    `release()` or `close()`."""

    status: int
    headers: dict[str, str]  # lower-case names; a repeated field's values joined by ", "

    @property
    def complete(self) -> bool:
        """The whole body has arrived and been read."""
        ...

    async def read_chunk(self, timeout: float) -> bytes:
        """The body bytes received since the last call (waiting up to `timeout`
        seconds for some); b"" at the end of the body."""
        ...

    async def read(self, timeout: float, limit: int | None = None) -> bytes:
        """The rest of the body, each wait for more bytes up to `timeout` seconds; past
        `limit` bytes, `BodyTooLarge` (and the connection is closed)."""
        ...

    def release(self) -> None:
        """Done with the answer: the connection is kept when the body was read to its
        end, and closed otherwise (which tells the backend to stop generating)."""
        ...

    def close(self) -> None:
        """Close the connection whatever was read."""
        ...


class BackendClient(Protocol):
    """The connections to one upstream."""

    loop: asyncio.AbstractEventLoop

    @property
    def open_connections(self) -> int:
        """Connections open now, in use or idle."""
        ...

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        *,
        timeout: float,
    ) -> BackendResponse:
        """Send a request; return once the status line and headers have arrived
        (within `timeout` seconds of the call, connecting included)."""
        ...

    async def close(self) -> None: ...


_SAFE_TARGET = re.compile(r"[!$&'()*+,\-./0-9:;=@A-Z_a-z~]*")


def request_target(base_path: str, path: str, raw_query: str) -> str:
    """The request-target: the upstream's base path, the path (percent-encoded
    where needed) and the client's query as it came."""
    if not _SAFE_TARGET.fullmatch(path):
        path = quote(path, safe="/:@!$&'()*+,;=-._~")
    target = base_path + path
    return target + "?" + raw_query if raw_query else target
