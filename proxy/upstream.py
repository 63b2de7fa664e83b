"""The terminal handler: the only code that talks to a backend.

It picks the upstream by model and its replica (proxy/routing.py, proxy/fleet/),
takes its place on the replica (proxy/fleet/slots.py: waiting for admission where
every replica is full), sends the request (proxy/attempt.py), retries and falls back
only before the first byte has gone to the client (and only where the request surely
never arrived), hedges a slow chat request where the upstream asks for it
(proxy/fleet/hedge.py), then hands the answer to proxy/relay.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from proxy import jsonfast, tracing
from proxy.attempt import MAX_ERROR_BODY, Failure, backoff, failed, open_answer, traced_open
from proxy.backend import BodyTooLarge, ClientError
from proxy.encoding import CannotDecode, content_encoding, decode_whole, undecodable
from proxy.errors import ProxyError, normalise_backend_error
from proxy.exchange import Exchange
from proxy.fleet.affinity import affinity_point
from proxy.fleet.hedge import hedged
from proxy.fleet.slots import admit, release
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
    data: bytes | None
    if ex.body is not None:
        # what the chain checked and changed, and nothing else (a duplicate key the
        # client sent reaches the backend once, as the chain read it)
        data = jsonfast.dumps(ex.body)
        ex.raw_body = b""
    else:
        data = ex.raw_body
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
                slot = await admit(ex, upstreams, live, index - 1, point, tried)
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
                    up, replica, resp, first, decoder = await hedged(
                        ex, upstreams, live, index - 1, up, replica, point, path, data
                    )
                    index = live.index(up) + 1
                elif ex.span is None:
                    resp, first, decoder = await open_answer(
                        up, replica, ex, replica.target(path, query), data
                    )
                else:
                    resp, first, decoder = await traced_open(
                        up, replica, ex, replica.target(path, query), data
                    )
            except Failure as failure:
                release(upstreams, up, replica)
                if failure.kind == "stale" and not stale_retried:
                    # the backend had just closed an idle pooled connection: once more,
                    # at once, without counting it as an attempt
                    stale_retried = True
                    attempt -= 1
                    continue
                last = failure
                failed(ex, up, replica, failure)
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
                release(upstreams, up, replica)  # the client left: its slot is free
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
                release(upstreams, up, replica)
    if last is None:
        raise ProxyError(
            503,
            "Every backend for this model is temporarily unavailable.",
            code="upstream_unavailable",
        )
    raise last.error


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
