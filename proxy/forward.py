"""The request headers a backend gets: the client's, less the hop-by-hop ones, those
the client's Connection header names, its credentials and those the proxy sets; then
the proxy's own (X-Request-Id, X-Forwarded-*, Accept-Encoding: identity, the
upstream's key, the middlewares' headers)."""

from __future__ import annotations

import re

from proxy import tracing
from proxy.exchange import Exchange
from proxy.routing import Replica

# request headers never forwarded: hop-by-hop ones, the client's credentials, and
# those the proxy sets itself
NEVER_FORWARDED = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "authorization",
        "x-api-key",
        "accept-encoding",
        "cookie",
        "expect",
        "x-request-id",
        "proxy-connection",
        # set by the proxy from what it saw (see _forwarded)
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        # the proxy's own or the client's checked one (proxy/tracing.py)
        "traceparent",
    }
)
# the proxy reads what it must of an answer: it asks for it unencoded
_IDENTITY = ("Accept-Encoding", "identity")
# Connection options that name no header
_CONNECTION_OPTIONS = frozenset({"close", "keep-alive", "upgrade", ""})

# ... and, when the proxy writes the JSON body itself, the client's Content-Type
_NEVER_WITH_BODY = NEVER_FORWARDED | {"content-type"}


_OWN_ID = re.compile(r"^req_([0-9a-f]{1,32})$")


def upstream_request_id(request_id: str) -> str:
    """The X-Request-Id sent to the backend. The proxy's own ids (`req_` and 32 hex
    digits) go as their digits, which parse as a UUID, as llama-cpp-python's server
    demands (it answers any other value with an empty 400); a client's own id goes as
    it came."""
    own = _OWN_ID.match(request_id)
    return own.group(1).rjust(32, "0") if own else request_id


def forward_headers(ex: Exchange, up: Replica) -> list[tuple[str, str]]:
    """The client's headers less the hop-by-hop ones (those the client's Connection
    header names too), those never forwarded and those the proxy sets; then the
    proxy's own: X-Request-Id, X-Forwarded-*, Accept-Encoding, the upstream's key."""
    request_headers = ex.request.headers
    extra = ex.upstream_headers
    drop = _NEVER_WITH_BODY if ex.body is not None else NEVER_FORWARDED
    more = ex.upstream_drop_headers
    if extra:
        more = more | {k.lower() for k in extra}
    if "Connection" in request_headers:
        named = {
            t.strip().lower() for v in request_headers.getall("Connection") for t in v.split(",")
        } - _CONNECTION_OPTIONS
        if named:
            more = more | named
    if more:
        headers = [
            (k, v)
            for k, v in request_headers.items()
            if (lk := k.lower()) not in drop and lk not in more
        ]
    else:
        headers = [(k, v) for k, v in request_headers.items() if k.lower() not in drop]
    headers.append(("X-Request-Id", upstream_request_id(ex.request_id)))
    _forwarded(ex, headers)
    headers.append(_IDENTITY)
    traceparent = ex.traceparent
    if traceparent is None:
        traceparent = ex.traceparent = (
            tracing.incoming(request_headers) or tracing.new_traceparent()
        )
    headers.append(("traceparent", traceparent))
    if extra:
        headers.extend(extra.items())
    headers.extend(up.auth)
    if ex.body is not None:
        headers.append(("Content-Type", "application/json"))
    return headers


def _forwarded(ex: Exchange, headers: list[tuple[str, str]]) -> None:
    """X-Forwarded-For with the peer's address appended (nginx's
    $proxy_add_x_forwarded_for), X-Forwarded-Proto and X-Forwarded-Host: the scheme and
    host the client used, or those a trusted balancer forwarded."""
    request = ex.request
    request_headers = request.headers
    peer = request.remote or "unknown"
    if "X-Forwarded-For" in request_headers:
        peer = ", ".join([*request_headers.getall("X-Forwarded-For"), peer])
    host = request_headers.get("Host")
    if ex.remote is not None:  # the peer is a balancer of server.trusted_proxies
        proto = request_headers.get("X-Forwarded-Proto") or request.scheme
        host = request_headers.get("X-Forwarded-Host") or host
    else:
        proto = request.scheme
    if host:
        headers += (
            ("X-Forwarded-For", peer),
            ("X-Forwarded-Proto", proto),
            ("X-Forwarded-Host", host),
        )
    else:
        headers += (("X-Forwarded-For", peer), ("X-Forwarded-Proto", proto))
