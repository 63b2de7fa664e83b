"""Hedged requests (`hedge.after_ms`): a chat request with no first byte by then goes
to another replica (or the next upstream with room) too; the first to answer wins and
the other is cancelled at once, its connection closed so that the engine stops."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy import metrics
from proxy.attempt import Failure, failed, traced_open
from proxy.backend import BackendResponse as Response
from proxy.encoding import Decoder
from proxy.exchange import Exchange
from proxy.fleet.slots import release, reserve
from proxy.routing import Replica, Upstream, Upstreams

Opened = tuple[Upstream, Replica, Response, bytes, Decoder | None]


async def hedged(
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
    primary = asyncio.ensure_future(traced_open(up, replica, ex, replica.target(path, query), data))
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
        traced_open(up2, replica2, ex, replica2.target(path, query), data)
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
                    release(upstreams, up, replica)
                    return (up2, replica2, *secondary.result())
    except asyncio.CancelledError:
        await _cancel(primary)
        await _cancel(secondary)
        release(upstreams, up2, replica2)
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
            reserve(up, replica)
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
            failed(ex, up, replica, exc)


def _drop_second(
    ex: Exchange,
    upstreams: Upstreams,
    up: Upstream,
    replica: Replica,
    task: asyncio.Future[tuple[Response, bytes, Decoder | None]],
) -> None:
    """The hedge lost or failed: as the first attempt that lost, and its slot freed."""
    _drop_first(ex, up, replica, task)
    release(upstreams, up, replica)


async def _cancel(task: asyncio.Future[Any]) -> None:
    """Cancel an attempt and wait for it to close its connection."""
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
