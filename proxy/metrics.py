"""Prometheus metrics.

With `serve --workers N` every worker writes to PROMETHEUS_MULTIPROC_DIR (set by the
parent before any worker imports prometheus_client) and /metrics adds them up, so a
scrape of any worker gives the totals of all of them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

if TYPE_CHECKING:
    from proxy.exchange import Exchange

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter(
    "chat_proxy_requests_total",
    "Requests answered, by route, status, model and API key id (empty: no key).",
    ["route", "status", "model", "key"],
)
LATENCY = Histogram(
    "chat_proxy_request_duration_seconds",
    "Time from request to the end of the response.",
    ["route"],
    buckets=_LATENCY,
)
TTFB = Histogram(
    "chat_proxy_time_to_first_byte_seconds",
    "Time from request to the backend's first byte.",
    ["route"],
    buckets=_LATENCY,
)
FIRST_TOKEN = Histogram(
    "chat_proxy_time_to_first_token_seconds",
    "Time from request to the first content or tool-call token sent to the client "
    "(what a caller hears; for a whole body, when it came).",
    ["route"],
    buckets=_LATENCY,
)
TOKENS = Counter(
    "chat_proxy_tokens_total", "Tokens reported by backends, by kind and model.", ["kind", "model"]
)
RATE_LIMITED = Counter(
    "chat_proxy_rate_limit_refusals_total", "Requests refused by a rate limit.", ["limit"]
)
UPSTREAM_ERRORS = Counter(
    "chat_proxy_upstream_errors_total",
    "Failed attempts at a backend, by upstream and kind.",
    ["upstream", "kind"],
)
CONNECTIONS_REFUSED = Counter(
    "chat_proxy_connections_refused_total",
    "Client connections answered with a 503 and closed: the process held "
    "server.max_connections (what its open-file limit allows).",
    ["reason"],
)
STREAMS = Gauge(
    "chat_proxy_streams_in_flight", "Streams being relayed now.", multiprocess_mode="livesum"
)
SESSIONS = Counter("chat_proxy_sessions_created_total", "Sessions created, by source.", ["source"])
REPLICA_IN_FLIGHT = Gauge(
    "chat_proxy_replica_in_flight",
    "Requests in flight on each replica of a fleet (by index).",
    ["upstream", "replica"],
    multiprocess_mode="livesum",
)
REPLICA_ERRORS = Counter(
    "chat_proxy_replica_errors_total",
    "Failed attempts at each replica of a fleet, by kind.",
    ["upstream", "replica", "kind"],
)
AFFINITY_SPILLS = Counter(
    "chat_proxy_affinity_spills_total",
    "Requests sent elsewhere because their own replica (the one named) was over its bounded load.",
    ["upstream", "replica"],
)
REPLICA_ENGINE = Gauge(
    "chat_proxy_replica_engine_requests",
    "Requests each replica's engine reports running or waiting (load.metrics).",
    ["upstream", "replica", "state"],
    multiprocess_mode="max",
)
HEDGES = Counter(
    "chat_proxy_hedges_total",
    "Hedged requests (hedge.after_ms) by upstream and which attempt won: the first, "
    "the hedge, or neither.",
    ["upstream", "winner"],
)
QUEUE_WAITING = Gauge(
    "chat_proxy_queue_waiting",
    "Requests waiting for admission, by the upstream they wait for first.",
    ["upstream"],
    multiprocess_mode="livesum",
)
QUEUE_WAIT = Histogram(
    "chat_proxy_queue_wait_seconds",
    "Time requests waited for admission (0 when a replica was free).",
    ["upstream"],
    buckets=(0.0, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
QUEUE_REFUSED = Counter(
    "chat_proxy_queue_refusals_total",
    "Requests the admission queue refused: full (429), waited too long (503), or "
    "whose client left while waiting.",
    ["reason"],
)
SESSION_TURNS_PENDING = Gauge(
    "chat_proxy_session_turns_pending",
    "Session turns waiting to be written, kept while the store is unavailable.",
    multiprocess_mode="livesum",
)
SESSION_TURNS_DROPPED = Counter(
    "chat_proxy_session_turns_dropped_total",
    "Session turns never written: the queue of pending turns was full (queue_full), "
    "the store refused the turn (refused), or the proxy stopped before the store "
    "came back (shutdown).",
    ["reason"],
)


_CHILDREN: dict[tuple[str, int, str, str], tuple[Any, Any, Any, Any]] = {}
_TOKEN_CHILDREN: dict[str, tuple[Any, Any]] = {}
_SESSION_CHILDREN: dict[str, Any] = {}


def observe(ex: Exchange) -> None:
    """Record one finished request."""
    route = "responses" if ex.output is not None else ex.route.name
    # the model label only for requests a backend answered: a client may send any name
    model = ex.model or "" if ex.upstream is not None else ""
    identity = ex.identity
    key_id = identity.id if identity is not None else ""  # configured ids: bounded
    key = (route, ex.status, model, key_id)
    children = _CHILDREN.get(key)
    if children is None:
        children = (
            REQUESTS.labels(route, str(ex.status), model, key_id),
            LATENCY.labels(route),
            TTFB.labels(route),
            FIRST_TOKEN.labels(route),
        )
        if len(_CHILDREN) < 10000:
            _CHILDREN[key] = children
    children[0].inc()
    children[1].observe(ex.elapsed_ms() / 1000)
    if ex.ttfb is not None:
        children[2].observe(ex.ttfb)
    if ex.first_token is not None:
        children[3].observe(ex.first_token)
    for failure in ex.failures:
        name, _, kind = str(failure).partition(":")
        name, _, replica = name.partition("/")
        UPSTREAM_ERRORS.labels(name, kind).inc()
        if replica:
            REPLICA_ERRORS.labels(name, replica, kind).inc()
    if ex.error and ex.error.startswith("upstream_") and ex.upstream and ex.status == 200:
        UPSTREAM_ERRORS.labels(ex.upstream, ex.error.removeprefix("upstream_")).inc()
    limit = ex.rate_limited
    if ex.status == 429 and isinstance(limit, str):
        RATE_LIMITED.labels(limit).inc()
    completion = ex.completion
    usage = completion.get("usage") if isinstance(completion, dict) else None
    if isinstance(usage, dict):
        tokens = _TOKEN_CHILDREN.get(model)
        if tokens is None:
            tokens = (TOKENS.labels("prompt", model), TOKENS.labels("completion", model))
            if len(_TOKEN_CHILDREN) < 10000:
                _TOKEN_CHILDREN[model] = tokens
        prompt = usage.get("prompt_tokens")
        if isinstance(prompt, int) and prompt > 0:
            tokens[0].inc(prompt)
        done = usage.get("completion_tokens")
        if isinstance(done, int) and done > 0:
            tokens[1].inc(done)
    source = ex.session_source
    if source in ("elevenlabs", "header", "new"):
        counter = _SESSION_CHILDREN.get(source)
        if counter is None:
            counter = _SESSION_CHILDREN[source] = SESSIONS.labels(source)
        counter.inc()


async def handle(request: web.Request) -> web.Response:
    """GET /metrics in the Prometheus text format."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
        data = generate_latest(registry)
    else:
        data = generate_latest()
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})
