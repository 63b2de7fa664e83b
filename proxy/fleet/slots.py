"""A request's place on a replica: taken (straight away, or after waiting in the
admission queue where every replica that could serve is full) and given back, with
the metrics and the span of the wait."""

from __future__ import annotations

import asyncio
import time

from proxy import metrics, tracing
from proxy.errors import ProxyError
from proxy.exchange import Exchange
from proxy.routing import Replica, Upstream, Upstreams


async def admit(
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
        reserve(up, replica)
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
            reserve(other, replica)
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


def reserve(up: Upstream, replica: Replica) -> None:
    replica.in_flight += 1
    if up.fleet:
        metrics.REPLICA_IN_FLIGHT.labels(up.name, replica.label).inc()


def release(upstreams: Upstreams, up: Upstream, replica: Replica) -> None:
    replica.in_flight -= 1
    if up.plain:
        return
    if up.fleet:
        metrics.REPLICA_IN_FLIGHT.labels(up.name, replica.label).dec()
    if up.max_in_flight is not None:
        upstreams.admission.released(up)
