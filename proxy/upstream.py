"""The terminal handler: the only code that talks to a backend.

It picks the upstream by model (proxy/routing.py), sends the request, retries and
falls back only before the first byte has gone to the client, then hands the answer
to proxy/relay.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from aiohttp import web

from proxy import jsonfast, metrics, sse
from proxy.backend import BackendResponse as Response
from proxy.backend import BodyTooLarge, ClientError, ConnectTimeout, Disconnected
from proxy.encoding import CannotDecode, Decoder, content_encoding, decode_whole, undecodable
from proxy.errors import ProxyError, normalise_backend_error
from proxy.exchange import Exchange
from proxy.fleet.affinity import affinity_point
from proxy.forward import forward_headers
from proxy.relay import relay
from proxy.routing import Replica, Upstream, Upstreams
from proxy.transform import MAX_EVENT_BYTES

__all__ = ["Upstream", "Upstreams", "handle", "list_models"]

log = logging.getLogger("chat_proxy.upstream")

# an error body is read up to this much; the rest is never read
MAX_ERROR_BODY = 1024 * 1024


class Failure(Exception):
    """An attempt that failed before the first byte; `retryable` says whether another
    attempt (here or on another upstream) may be made."""

    def __init__(
        self, kind: str, error: ProxyError, retryable: bool, retry_after: float | None = None
    ):
        super().__init__(error.message)
        self.kind = kind
        self.error = error
        self.retryable = retryable
        self.retry_after = retry_after


def _backoff(attempt: int, up: Upstream, retry_after: float | None) -> float:
    r = up.cfg.retries
    delay = min(r.backoff_max, r.backoff_initial * (2 ** (attempt - 1)))
    delay = random.uniform(delay / 2, delay) if delay else 0.0
    if retry_after is not None:
        delay = max(delay, min(retry_after, r.retry_after_max))
    return delay


def _retry_after(resp: Response) -> float | None:
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


async def _open(
    up: Upstream, replica: Replica, ex: Exchange, target: str, data: bytes | None
) -> tuple[Response, bytes, Decoder | None]:
    """Send the request; return the answer, its first bytes (for a stream: up to its
    first data event) and the decoder of a stream's Content-Encoding, or raise
    Failure."""
    pool = replica.pool
    assert pool is not None
    t = up.cfg.timeouts
    loop = pool.loop
    deadline = loop.time() + t.first_byte
    resp: Response | None = None
    try:
        resp = await pool.request(
            ex.request.method,
            target,
            forward_headers(ex, replica),
            data,
            timeout=t.first_byte,
        )
        if resp.status >= 400:
            body = await _error_body(resp, max(deadline - loop.time(), 0.001))
            raise _http_failure(up, resp, body)
        first = await resp.read_chunk(max(deadline - loop.time(), 0.001))
        if not resp.headers.get("content-type", "").startswith("text/event-stream"):
            return resp, first, None
        decoder = None
        encoding = content_encoding(resp.headers)
        if encoding is not None:
            try:
                decoder = Decoder(encoding, MAX_EVENT_BYTES)
                first = decoder.feed(first) if first else decoder.end()
            except CannotDecode as exc:
                resp.close()
                raise Failure("bad_response", undecodable(exc), False) from None
        # comments (`: ping`) do not commit the answer: a stream is one once its first
        # event with a field has come
        while not sse.has_field(first):
            more = await resp.read_chunk(max(deadline - loop.time(), 0.001))
            if decoder is not None:
                try:
                    more = decoder.feed(more) if more else decoder.end()
                except CannotDecode as exc:
                    resp.close()
                    raise Failure("bad_response", undecodable(exc), False) from None
                if not more and not resp.complete:
                    continue
            if not more:
                # and never reuse the connection: the backend (llama-cpp-python)
                # closes it next
                resp.close()
                raise Failure(
                    "empty",
                    ProxyError(
                        502,
                        "The backend ended the stream without sending anything."
                        if not first
                        else "The backend ended the stream without sending any event "
                        "(only comments).",
                        code="upstream_empty",
                    ),
                    True,
                )
            first += more
            if len(first) > MAX_EVENT_BYTES:
                resp.close()
                raise Failure(
                    "bad_response",
                    ProxyError(
                        502,
                        "The backend sent only comments, more than "
                        f"{MAX_EVENT_BYTES // 1048576} MiB of them.",
                        code="upstream_bad_response",
                    ),
                    False,
                )
        return resp, first, decoder
    except Failure:
        raise
    except ConnectTimeout:
        # no connection in time: the request never left, and may go again
        raise Failure(
            "connect_timeout",
            ProxyError(
                504,
                f"No connection to the backend could be had within {t.first_byte:g} seconds.",
                code="upstream_timeout",
            ),
            True,
        ) from None
    except TimeoutError:
        if resp is not None:
            resp.close()
        # the backend may be working on it: never sent again
        raise Failure(
            "timeout",
            ProxyError(
                504,
                f"The backend did not answer within {t.first_byte:g} seconds.",
                code="upstream_timeout",
            ),
            False,
        ) from None
    except Disconnected as exc:
        # on a reused keep-alive connection, most often one the backend had just closed
        # as idle: the request surely never reached it, and may go again (as Go's
        # net/http does); a fresh connection that took the request and closed may
        # have run it
        raise Failure(
            "stale" if exc.reused or not exc.sent else "closed",
            ProxyError(
                502,
                "The backend closed the connection without answering.",
                code="upstream_unreachable",
            ),
            exc.reused or not exc.sent,
        ) from None
    except ClientError:
        if resp is not None:
            resp.close()
        raise Failure(
            "reset" if resp is not None else "bad_response",
            ProxyError(
                502,
                "The backend closed the connection early."
                if resp is not None
                else "The backend's answer is not valid HTTP.",
                code="upstream_reset" if resp is not None else "upstream_bad_response",
            ),
            False,
        ) from None
    except OSError as exc:
        if resp is not None:
            resp.close()
        raise Failure(
            "connect" if resp is None else "reset",
            ProxyError(
                502,
                f"The backend is unreachable ({type(exc).__name__}).",
                code="upstream_unreachable",
            ),
            resp is None,  # a connection that could not be made took nothing
        ) from None
    except BaseException:
        if resp is not None:
            resp.close()
        raise


async def _error_body(resp: Response, timeout: float) -> bytes:
    """A backend's error body, up to MAX_ERROR_BODY bytes (the rest is never read and
    the connection not reused)."""
    try:
        body = await resp.read(timeout, MAX_ERROR_BODY)
    except BodyTooLarge:
        return b""
    resp.release()
    return body


def _http_failure(up: Upstream, resp: Response, body: bytes) -> Failure:
    """A backend's 4xx/5xx answer, as the client will see it."""
    err = normalise_backend_error(resp.status, body)
    retryable = resp.status in (429, 502, 503, 504)
    if resp.status >= 500:
        status = resp.status if resp.status in (502, 503, 504) else 502
        message = err.message
        if resp.status not in (502, 503, 504) or "Traceback" in message:
            # a backend's internal failure may quote its traceback: log it, do not
            # show it
            log.warning(
                "backend error",
                extra={"upstream": up.name, "status": resp.status, "detail": message[:2000]},
            )
            message = f"The backend failed (status {resp.status})."
        err = ProxyError(status, message)
    after = _retry_after(resp)
    if after is not None and resp.status in (429, 503):
        err.headers["Retry-After"] = str(max(1, round(after)))
    return Failure(f"http_{resp.status}", err, retryable, after)


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
    last: Failure | None = None
    stale_retried = False
    index = 0
    while index < len(live):
        up = live[index]
        index += 1
        attempt = 0
        avoid: Replica | None = None
        while attempt < up.cfg.retries.attempts:
            if up.plain:
                replica = up.replicas[0]
                replica.in_flight += 1
            else:
                slot = await _admit(ex, upstreams, live, index - 1, point, avoid)
                if slot is None:
                    break  # every replica's circuit opened: the next upstream
                if slot[0] is not up:
                    # admitted by a later upstream while this one was full
                    up = slot[0]
                    index = live.index(up) + 1
                    attempt = 0
                replica = slot[1]
            attempt += 1
            ex.attempts += 1
            try:
                resp, first, decoder = await _open(
                    up, replica, ex, replica.target(path, ex.request.rel_url.raw_query_string), data
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
                where = f"{up.name}/{replica.index}" if up.fleet else up.name
                ex.failures.append(f"{where}:{failure.kind}")
                if failure.kind != "http_429" and (
                    failure.retryable or not failure.kind.startswith("http_")
                ):
                    replica.record(False)  # busy is not broken, and a 4xx is the client's
                if not failure.retryable:
                    # an answer to give as it is, or a request that may have reached
                    # the backend: never sent again, here or elsewhere
                    ex.upstream = up.name
                    if up.fleet:
                        ex.replica = replica.index
                    raise failure.error from None
                if up.is_open:
                    break
                avoid = replica  # another replica, where there is one
                if attempt < up.cfg.retries.attempts:
                    await asyncio.sleep(_backoff(attempt, up, failure.retry_after))
                continue
            replica.record(True)
            ex.upstream = up.name
            headers = ex.response_headers
            headers["x-upstream"] = up.name
            if up.fleet:
                ex.replica = replica.index
                headers["x-upstream-replica"] = replica.label
            if ex.attempts > 1:
                headers["x-upstream-attempts"] = str(ex.attempts)
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


async def _admit(
    ex: Exchange,
    upstreams: Upstreams,
    live: list[Upstream],
    index: int,
    point: int | None,
    avoid: Replica | None,
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
        raise
    except asyncio.CancelledError:
        metrics.QUEUE_REFUSED.labels("client_left").inc()
        raise
    finally:
        gauge.dec()
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
