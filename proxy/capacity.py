"""How many client connections one process takes: its open-file limit, shared out.

Every client connection holds a descriptor, and so does every connection to a
backend (at most the upstreams' `max_connections`, each replica a pool of its own);
the store, the logs and the listening sockets hold a few more. A process that runs
out of descriptors cannot accept(): the event loop closes the connection it could
not take, and the client gets nothing at all. So the proxy keeps the count below
the limit itself: at start it raises its soft limit to the hard one, and takes at
most `server.max_connections` client connections (by default what the limit leaves
once the pools and a margin are counted); one more is answered with a 503
`too_many_connections` and closed (`Refuser`, asked by proxy/inbound.py's server
for each connection over the limit), counted in
`chat_proxy_connections_refused_total{reason="max_connections"}` and logged at
most once a minute.

`warn_limit` is that log line for every limit of the proxy's own (a backend pool with
every connection in use, no descriptor left for a backend connection too: see
proxy/attempt.py), and `open_file_limit` the limit it names.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time

from proxy.config import LoadedConfig
from proxy.errors import ProxyError
from proxy.metrics import CONNECTIONS_REFUSED

log = logging.getLogger("chat_proxy")

# descriptors kept for what is not a connection: the store, logs, the listening
# sockets, the metrics files of several workers, a resolver
MARGIN = 64
# never fewer client connections than this, whatever the limit says
MINIMUM = 16


# a limit reached is logged at most once a minute for each key, with how many times
# it was reached since the last line
WARN_EVERY = 60.0
_warned: dict[str, float] = {}
_reached: dict[str, int] = {}


def warn_limit(key: str, message: str, **extra: object) -> None:
    """A limit of the proxy's reached: a warning at most once a minute for `key`,
    whose `times` says how often it was reached since the last one (this time
    included)."""
    times = _reached.get(key, 0) + 1
    now = time.monotonic()
    if now - _warned.get(key, -WARN_EVERY) < WARN_EVERY:
        _reached[key] = times
        return
    _warned[key] = now
    _reached[key] = 0
    log.warning(message, extra={**extra, "times": times})


def open_file_limit() -> int:
    """The process's soft limit on open files now."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_file_limit() -> int:
    """The soft limit on open files raised to the hard one; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit: %s", exc)
    return soft


def backend_connections(config: LoadedConfig) -> int:
    """The most connections the upstreams' pools may hold at once."""
    return sum(up.max_connections * len(up.urls) for up in config.upstreams)


def client_connections(config: LoadedConfig, files: int) -> int:
    """The client connections this process takes: `server.max_connections`, or what
    `files` descriptors leave once the backend pools and the margin are counted."""
    if config.server.max_connections is not None:
        return config.server.max_connections
    return max(MINIMUM, files - MARGIN - backend_connections(config))


def _raw_503(limit: int) -> bytes:
    body = ProxyError(
        503,
        f"The proxy holds as many connections as it takes ({limit}, its "
        "server.max_connections or what its open-file limit allows); try again shortly.",
        code="too_many_connections",
    ).to_bytes()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "retry-after-ms: 1000\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


# how long and how much of a refused connection's request head is read before the 503
REFUSAL_READ_SECONDS = 1.0
REFUSAL_READ_BYTES = 65536
# refused connections read at once, at most (each holds a descriptor meanwhile); more
# get the 503 written and are closed at once, whether or not the client reads it
REFUSING_MAX = 32


class Refusal(asyncio.Protocol):
    """A connection over the limit: read its request head (so that the client, still
    sending, is not reset before it reads the answer), answer 503, close."""

    __slots__ = ("_answer", "_linger", "_read", "_refuser", "_timer", "_transport")

    def __init__(self, refuser: Refuser, answer: bytes, linger: bool) -> None:
        self._refuser = refuser
        self._answer = answer
        self._linger = linger  # read the head first (False: answer and close at once)
        self._read = 0
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        if not self._linger:
            self._finish()
            return
        self._refuser.refusing += 1
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_READ_SECONDS, self._finish)

    def data_received(self, data: bytes) -> None:
        self._read += len(data)
        if b"\r\n\r\n" in data or self._read >= REFUSAL_READ_BYTES:
            self._finish()

    def _finish(self) -> None:
        t = self._transport
        if t is not None and not t.is_closing():
            t.write(self._answer)
            t.close()
        self._transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._refuser.refusing -= 1
        self._transport = None


class Refuser:
    """The refusals of one server: each counted and (at most once a minute) logged."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.refusing = 0  # refused connections whose request head is being read
        self._answer = _raw_503(limit)

    def refuse(self) -> Refusal:
        CONNECTIONS_REFUSED.labels("max_connections").inc()
        warn_limit(
            "max_connections",
            "client connections refused: the process holds as many as it takes",
            max_connections=self.limit,
        )
        return Refusal(self, self._answer, linger=self.refusing < REFUSING_MAX)
