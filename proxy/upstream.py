"""The terminal handler: the only code that talks to a backend.

It picks the upstream by model and its replica (proxy/routing.py, proxy/fleet/),
waits for admission where the replicas are full, sends the request
(proxy/attempt.py), retries and falls back only before the first byte has gone to
the client (and only where the request surely never arrived), hedges a slow chat
request where the upstream asks for it, then hands the answer to proxy/relay.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from proxy import jsonfast, metrics, tracing
from proxy.attempt import MAX_ERROR_BODY, Failure, backoff, open_answer
from proxy.backend import BackendResponse as Response
from proxy.backend import BodyTooLarge, ClientError
from proxy.encoding import CannotDecode, Decoder, content_encoding, decode_whole, undecodable
from proxy.errors import ProxyError, normalise_backend_error
from proxy.exchange import Exchange
from proxy.fleet.affinity import affinity_point
from proxy.forward import forward_headers
from proxy.relay import relay
from proxy.routes import CHAT
from proxy.routing import Replica, Upstream, Upstreams

__all__ = ["Upstream", "Upstreams", "handle", "list_models"]

log = logging.getLogger("chat_proxy.upstream")


async def handle(ex: Exchange, upstreams: Upstreams, path: str) -> web.StreamResponse:
    """Relay the exchange to the first upstream that answers."""
    candidates = upstreams.candidates(ex.model)
    if not candidates:
        raise ProxyError(
            404,
            f"The model `{ex.model}` is not served here."
            if ex.model
            else "No upstream serves this request.",
            param="model" if ex.model else None,
            code="model_not_found",
        )
    live = [u for u in candidates if not u.is_open]
    if not live:
        raise ProxyError(
            503,
            "Every backend for this model is temporarily unavailable.",
            code="upstream_unavailable",
        )
    data = jsonfast.dumps(ex.body) if ex.body is not None else ex.raw_body
    point = affinity_point(ex) if upstreams.affinity else None
    query = ex.request.rel_url.raw_query_string
    last: Failure | None = None
    stale_retried = False
    index = 0
    while index < len(live):
        up = live[index]
        index += 1
        attempt = 0
        tried: set[Replica] = set()
        while attempt < up.cfg.retries.attempts:
            if up.plain:
                replica = up.replicas[0]
                replica.in_flight += 1
            else:
                slot = await _admit(ex, upstreams, live, index - 1, point, tried)
                if slot is None:
                    break  # every replica's circuit opened: the next upstream
                if slot[0] is not up:
                    # admitted by a later upstream while this one was full
                    up = slot[0]
                    index = live.index(up) + 1
                    attempt = 0
                    tried = set()
                replica = slot[1]
            attempt += 1
            ex.attempts += 1
            try:
                sent = time.perf_counter()
                if up.cfg.hedge.after_ms and ex.route is CHAT and ex.attempts == 1:
                    up, replica, resp, first, decoder = await _hedged(
                        ex, upstreams, live, index - 1, up, replica, point, path, data
                    )
                    index = live.index(up) + 1
                elif ex.span is None:
                    resp, first, decoder = await open_answer(
                        up, replica, ex, replica.target(path, query), data
                    )
                else:
                    resp, first, decoder = await _attempt(
                        up, replica, ex, replica.target(path, query), data
                    )
            except Failure as failure:
                _release(upstreams, up, replica)
                if failure.kind == "stale" and not stale_retried:
                    # the backend had just closed an idle pooled connection: once more,
                    # at once, without counting it as an attempt
                    stale_retried = True
                    attempt -= 1
                    continue
                last = failure
                _failed(ex, up, replica, failure)
                if not failure.retryable:
                    # an answer to give as it is, or a request that may have reached
                    # the backend: never sent again, here or elsewhere
                    ex.upstream = up.name
                    if up.fleet:
                        ex.replica = replica.index
                    raise failure.error from None
                if up.is_open:
                    break
                tried.add(replica)
                if up.fleet and any(not r.is_open and r not in tried for r in up.replicas):
                    # it never arrived: another replica takes it, as another upstream
                    # would, without spending an attempt or waiting
                    attempt -= 1
                    continue
                tried.clear()
                if attempt < up.cfg.retries.attempts:
                    await asyncio.sleep(backoff(attempt, up, failure.retry_after))
                continue
            except BaseException:
                _release(upstreams, up, replica)  # the client left: its slot is free
                raise
            replica.record(True)
            ex.upstream = up.name
            headers = ex.response_headers
            headers["x-upstream"] = up.name
            if up.fleet:
                ex.replica = replica.index
                headers["x-upstream-replica"] = replica.label
            if ex.attempts > 1:
                headers["x-upstream-attempts"] = str(ex.attempts)
            headers["Server-Timing"] = tracing.server_timing(
                ex, (time.perf_counter() - sent) * 1000
            )
            try:
                return await relay(
                    ex, up, resp, first, upstreams.keepalive, upstreams.max_response_bytes, decoder
                )
            finally:
                # back to the pool when read to the end; closed (and so cancelled at
                # the backend) otherwise
                resp.release()
                _release(upstreams, up, replica)
    if last is None:
        raise ProxyError(
            503,
            "Every backend for this model is temporarily unavailable.",
            code="upstream_unavailable",
        )
    raise last.error


async def _attempt(
    up: Upstream, replica: Replica, ex: Exchange, target: str, data: bytes | None
) -> tuple[Response, bytes, Decoder | None]:
    """One attempt, in a span of its own when tracing (whose traceparent the backend
    gets)."""
    tracer = tracing.TRACING
    if tracer is None or ex.span is None:
        return await open_answer(up, replica, ex, target, data)
    span = tracer.child(
        ex.span,
        "attempt",
        True,
        {"chat_proxy.upstream": up.name, "chat_proxy.replica": replica.index},
    )
    ex.traceparent = tracer.traceparent(span)
    try:
        resp, first, decoder = await open_answer(up, replica, ex, target, data)
    except Failure as failure:
        span.set_attribute("error.type", failure.kind)
        tracer.fail(span, failure.kind)
        span.end()
        raise
    except BaseException:
        span.set_attribute("error.type", "cancelled")
        span.end()
        raise
    span.set_attribute("http.response.status_code", resp.status)
    span.end()
    return resp, first, decoder


def _failed(ex: Exchange, up: Upstream, replica: Replica, failure: Failure) -> None:
    """A failed attempt, for the access line, the metrics and the replica's circuit."""
    where = f"{up.name}/{replica.index}" if up.fleet else up.name
    ex.failures.append(f"{where}:{failure.kind}")
    if failure.kind != "http_429" and (failure.retryable or not failure.kind.startswith("http_")):
        replica.record(False)  # busy is not broken, and a 4xx is the client's


Opened = tuple[Upstream, Replica, Response, bytes, Decoder | None]


async def _hedged(
    ex: Exchange,
    upstreams: Upstreams,
    live: list[Upstream],
    index: int,
    up: Upstream,
    replica: Replica,
    point: int | None,
    path: str,
    data: bytes | None,
) -> Opened:
    """The attempt on `replica`, and when it has no first byte after hedge.after_ms,
    a second one on another replica (or the next upstream with room); the first to
    start answering wins and the other is cancelled at once (its connection closed:
    the backend sees the request go). When both fail, the second's failure is
    recorded and the first's raised (its slot is the caller's to release)."""
    query = ex.request.rel_url.raw_query_string
    primary = asyncio.ensure_future(open_answer(up, replica, ex, replica.target(path, query), data))
    try:
        done, _ = await asyncio.wait({primary}, timeout=up.cfg.hedge.after_ms / 1000)
    except asyncio.CancelledError:
        await _cancel(primary)
        raise
    if done:
        return (up, replica, *primary.result())
    second = _hedge_slot(live, index, point, replica)
    if second is None:
        try:
            return (up, replica, *(await primary))
        except asyncio.CancelledError:
            await _cancel(primary)
            raise
    up2, replica2 = second
    ex.attempts += 1
    secondary = asyncio.ensure_future(
        _attempt(up2, replica2, ex, replica2.target(path, query), data)
    )
    pending = {primary, secondary}
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            # the first to answer wins; when both answered in one turn, the first sent
            for task in (primary, secondary):
                if task in done and task.exception() is None:
                    loser = secondary if task is primary else primary
                    await _cancel(loser)
                    if task is primary:
                        _drop_second(ex, upstreams, up2, replica2, secondary)
                        metrics.HEDGES.labels(up.name, "first").inc()
                        return (up, replica, *primary.result())
                    _drop_first(ex, up, replica, primary)
                    metrics.HEDGES.labels(up.name, "hedge").inc()
                    _release(upstreams, up, replica)
                    return (up2, replica2, *secondary.result())
    except asyncio.CancelledError:
        await _cancel(primary)
        await _cancel(secondary)
        _release(upstreams, up2, replica2)
        raise
    # both failed
    metrics.HEDGES.labels(up.name, "neither").inc()
    _drop_second(ex, upstreams, up2, replica2, secondary)
    return (up, replica, *primary.result())  # raises its Failure


def _hedge_slot(
    live: list[Upstream], index: int, point: int | None, busy: Replica
) -> tuple[Upstream, Replica] | None:
    """Another replica of the upstream, or a replica of a later one, with room now;
    reserved. A hedge never waits for admission."""
    for up in live[index:]:
        if up.is_open:
            continue
        replica = up.choose(point, {busy})
        if replica is not None and replica is not busy:
            _reserve(up, replica)
            return up, replica
    return None


def _drop_first(
    ex: Exchange,
    up: Upstream,
    replica: Replica,
    task: asyncio.Future[tuple[Response, bytes, Decoder | None]],
) -> None:
    """The first attempt lost: its answer (if it came in the same turn) closed, its
    failure recorded."""
    if task.done() and not task.cancelled():
        exc = task.exception()
        if exc is None:
            task.result()[0].close()
        elif isinstance(exc, Failure):
            _failed(ex, up, replica, exc)


def _drop_second(
    ex: Exchange,
    upstreams: Upstreams,
    up: Upstream,
    replica: Replica,
    task: asyncio.Future[tuple[Response, bytes, Decoder | None]],
) -> None:
    """The hedge lost or failed: its answer closed, its failure recorded, its slot
    freed."""
    if task.done() and not task.cancelled():
        exc = task.exception()
        if exc is None:
            task.result()[0].close()
        elif isinstance(exc, Failure):
            _failed(ex, up, replica, exc)
    _release(upstreams, up, replica)


async def _cancel(task: asyncio.Future[Any]) -> None:
    """Cancel an attempt and wait for it to close its connection."""
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _admit(
    ex: Exchange,
    upstreams: Upstreams,
    live: list[Upstream],
    index: int,
    point: int | None,
    avoid: set[Replica],
) -> tuple[Upstream, Replica] | None:
    """A replica of live[index] (or, when it is full, of a later upstream with room)
    reserved for this request; waits in the admission queue when all of them are
    full; None when none can serve at all (their circuits open)."""
    up = live[index]
    replica = up.choose(point, avoid)
    if replica is not None:
        _reserve(up, replica)
        if up.max_in_flight is not None:
            ex.queue_ms = 0.0
            ex.response_headers["x-queue-ms"] = "0"
            metrics.QUEUE_WAIT.labels(up.name).observe(0.0)
        return up, replica
    if up.max_in_flight is None or up.is_open:
        return None
    rest = live[index:]
    for other in rest[1:]:
        replica = other.choose(point)
        if replica is not None:
            _reserve(other, replica)
            if other.max_in_flight is not None:
                ex.queue_ms = 0.0
                ex.response_headers["x-queue-ms"] = "0"
            return other, replica
    waits = [u for u in rest if u.max_in_flight is not None and not u.is_open]
    identity = ex.identity
    started = time.perf_counter()
    gauge = metrics.QUEUE_WAITING.labels(up.name)
    gauge.inc()
    tracer = tracing.TRACING
    span = (
        tracer.child(ex.span, "admission", False, {"chat_proxy.upstream": up.name})
        if tracer is not None and ex.span is not None
        else None
    )
    try:
        slot = await upstreams.admission.wait(
            waits,
            point,
            ex.client_id,
            identity.priority if identity is not None else 0,
            identity.weight if identity is not None else 1.0,
        )
    except ProxyError as exc:
        metrics.QUEUE_REFUSED.labels(exc.code or "refused").inc()
        ex.queue_ms = (time.perf_counter() - started) * 1000
        exc.headers["x-queue-ms"] = str(round(ex.queue_ms))
        raise
    except asyncio.CancelledError:
        metrics.QUEUE_REFUSED.labels("client_left").inc()
        raise
    finally:
        gauge.dec()
        if span is not None:
            span.set_attribute("chat_proxy.queue_ms", (time.perf_counter() - started) * 1000)
            span.end()
    waited = time.perf_counter() - started
    ex.queue_ms = waited * 1000
    ex.response_headers["x-queue-ms"] = str(round(waited * 1000))
    metrics.QUEUE_WAIT.labels(slot[0].name).observe(waited)
    if slot[0].fleet:
        metrics.REPLICA_IN_FLIGHT.labels(slot[0].name, slot[1].label).inc()
    return slot


def _reserve(up: Upstream, replica: Replica) -> None:
    replica.in_flight += 1
    if up.fleet:
        metrics.REPLICA_IN_FLIGHT.labels(up.name, replica.label).inc()


def _release(upstreams: Upstreams, up: Upstream, replica: Replica) -> None:
    replica.in_flight -= 1
    if up.plain:
        return
    if up.fleet:
        metrics.REPLICA_IN_FLIGHT.labels(up.name, replica.label).dec()
    if up.max_in_flight is not None:
        upstreams.admission.released(up)


def model_list_merge(docs: list[Any]) -> dict[str, Any]:
    """Merge several backends' /models answers into one list, first wins per id."""
    seen: dict[str, Any] = {}
    for doc in docs:
        items = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            # Ollama's native /api/tags shape: {"models": [{"name": ...}]}
            items = doc.get("models") if isinstance(doc, dict) else None
            if not isinstance(items, list):
                continue
        for item in items:
            if isinstance(item, dict):
                mid = item.get("id") or item.get("name") or item.get("model")
                if isinstance(mid, str) and mid not in seen:
                    seen[mid] = (
                        {**item, "id": mid, "object": "model"} if "object" not in item else item
                    )
    return {"object": "list", "data": list(seen.values())}


async def list_models(ex: Exchange, upstreams: Upstreams) -> web.StreamResponse:
    """GET /v1/models: every upstream's list, merged; middlewares filter and add."""
    docs: list[Any] = []
    errors: list[ProxyError] = []
    for up in upstreams.all:
        # the replicas of an upstream serve the same models: one of them answers
        replica = next((r for r in up.replicas if r.pool is not None and not r.is_open), None)
        if replica is None or replica.pool is None:
            continue
        timeout = up.cfg.timeouts.first_byte
        try:
            resp = await replica.pool.request(
                "GET",
                replica.target("/models", ""),
                forward_headers(ex, replica),
                None,
                timeout=timeout,
            )
            try:
                cap = MAX_ERROR_BODY if resp.status >= 400 else upstreams.max_response_bytes
                body = await resp.read(timeout, cap)
            finally:
                resp.release()
            encoding = content_encoding(resp.headers)
            if encoding is not None:
                body = decode_whole(body, encoding, upstreams.max_response_bytes)
            if resp.status >= 400:
                errors.append(normalise_backend_error(resp.status, body))
                continue
            docs.append(jsonfast.loads(body))
        except BodyTooLarge:
            errors.append(
                ProxyError(
                    502,
                    "The backend's model list is larger than server.max_response_bytes.",
                    code="upstream_too_large",
                )
            )
        except CannotDecode as exc:
            errors.append(undecodable(exc))
        except (TimeoutError, ClientError, OSError, ValueError) as exc:
            errors.append(
                ProxyError(
                    502,
                    f"The backend is unreachable ({type(exc).__name__}).",
                    code="upstream_unreachable",
                )
            )
    if not docs and errors:
        raise errors[0]
    doc = model_list_merge(docs)
    for transform in reversed(ex.body_transforms):
        doc = transform(doc)
    ex.status = 200
    headers = dict(ex.response_headers)
    return web.json_response(doc, headers=headers)
