"""The terminal handler: the only code that talks to a backend.

It picks the upstream by model, sends the request, retries and falls back only
before the first byte has gone to the client, and relays the answer: raw bytes as
they arrive when no middleware needs the response, or parsed, transformed and
re-encoded events where one does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from proxy import sse
from proxy.completion import Accumulator
from proxy.config import UpstreamConfig
from proxy.errors import (
    ProxyError,
    normalise_backend_error,
    normalise_error_payload,
    sse_error_event,
)
from proxy.exchange import EventTransform, Exchange
from proxy.metrics import STREAMS

log = logging.getLogger("chat_proxy.upstream")

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
# request headers never forwarded: hop-by-hop ones, the client's credentials, and
# those the proxy sets itself
_DROP_REQUEST = {
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
}
_BOUNDARIES = (b"\n\n", b"\r\r", b"\r\n\r\n")


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


class Upstream:
    """One configured backend: its connection pool and its passive health."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.base = URL(cfg.url) if not cfg.url.startswith("echo:") else URL("http://127.0.0.1")
        self.session: aiohttp.ClientSession | None = None
        self.failures = 0
        self.open_until = 0.0
        self.auth = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}

    def serves(self, model: str | None) -> bool:
        name = model or ""
        return any(fnmatchcase(name, pattern) for pattern in self.cfg.models)

    @property
    def is_open(self) -> bool:
        return self.open_until > time.monotonic()

    def state(self) -> str:
        if self.session is None:
            return "stopped"
        if self.is_open:
            return "open"
        return "degraded" if self.failures else "ok"

    def record(self, ok: bool) -> None:
        if ok:
            self.failures = 0
            self.open_until = 0.0
            return
        self.failures += 1
        if self.failures >= self.cfg.circuit.failures:
            self.open_until = time.monotonic() + self.cfg.circuit.cooldown
            log.warning(
                "upstream circuit open",
                extra={
                    "upstream": self.name,
                    "failures": self.failures,
                    "cooldown": self.cfg.circuit.cooldown,
                },
            )

    def url(self, path: str, query: str) -> URL:
        # path is everything after /v1 (or the bare path for /chat/completions)
        base = str(self.base).rstrip("/")
        return URL(base + path + (f"?{query}" if query else ""), encoded=True)

    async def start(self) -> None:
        if self.cfg.url.startswith("echo:"):
            from proxy.echo import start_echo

            self.base = await start_echo(self.cfg.url)
        connector = aiohttp.TCPConnector(
            limit=self.cfg.max_connections, ttl_dns_cache=300, enable_cleanup_closed=True
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.timeouts.connect),
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self.cfg.url.startswith("echo:"):
            from proxy.echo import stop_echo

            await stop_echo(self.base)


class Upstreams:
    def __init__(self, configs: Iterable[UpstreamConfig]) -> None:
        self.all = [Upstream(c) for c in configs]
        self.keepalive = 0.0

    async def start(self) -> None:
        for up in self.all:
            await up.start()

    async def close(self) -> None:
        for up in self.all:
            await up.close()

    def candidates(self, model: str | None) -> list[Upstream]:
        """Upstreams serving `model` in the order to try them: config order, except
        that upstreams with a `weight` matching alongside the first are balanced."""
        matching = [u for u in self.all if u.serves(model)]
        if len(matching) > 1 and matching[0].cfg.weight != 1:
            weighted = [u for u in matching if u.cfg.weight != 1]
            rest = [u for u in matching if u.cfg.weight == 1]
            order: list[Upstream] = []
            pool = list(weighted)
            while pool:
                pick = random.choices(pool, weights=[u.cfg.weight for u in pool])[0]
                order.append(pick)
                pool.remove(pick)
            matching = order + rest
        return matching

    def states(self) -> dict[str, str]:
        return {u.name: u.state() for u in self.all}


def _forward_headers(ex: Exchange, up: Upstream) -> dict[str, str]:
    drop = ex.upstream_drop_headers
    headers = {
        k: v
        for k, v in ex.request.headers.items()
        if k.lower() not in _DROP_REQUEST and k.lower() not in drop
    }
    headers["X-Request-Id"] = ex.request_id
    headers.update(ex.upstream_headers)
    headers.update(up.auth)
    if ex.body is not None:
        headers["Content-Type"] = "application/json"
    return headers


def _backoff(attempt: int, up: Upstream, retry_after: float | None) -> float:
    r = up.cfg.retries
    delay = min(r.backoff_max, r.backoff_initial * (2 ** (attempt - 1)))
    delay = random.uniform(delay / 2, delay) if delay else 0.0
    if retry_after is not None:
        delay = max(delay, min(retry_after, r.retry_after_max))
    return delay


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


async def _open(
    up: Upstream, ex: Exchange, path: str, data: bytes | None
) -> tuple[aiohttp.ClientResponse, bytes]:
    """Send the request; return the response and its first bytes, or raise Failure."""
    assert up.session is not None
    t = up.cfg.timeouts
    resp: aiohttp.ClientResponse | None = None
    try:
        async with asyncio.timeout(t.first_byte):
            resp = await up.session.request(
                ex.request.method,
                up.url(path, ex.request.query_string),
                data=data,
                headers=_forward_headers(ex, up),
                allow_redirects=False,
            )
            if resp.status >= 400:
                body = await resp.read()
                resp.release()
                err = normalise_backend_error(resp.status, body)
                retryable = resp.status in (429, 502, 503, 504)
                if resp.status >= 500:
                    status = resp.status if resp.status in (502, 503, 504) else 502
                    err = ProxyError(status, err.message)
                after = _retry_after(resp)
                if after is not None and resp.status in (429, 503):
                    err.headers["Retry-After"] = str(max(1, round(after)))
                raise Failure(f"http_{resp.status}", err, retryable, after)
            first = await resp.content.readany()
            if not first and resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                resp.close()
                raise Failure(
                    "empty",
                    ProxyError(
                        502, "The backend ended the stream without sending anything.", code="upstream_empty"
                    ),
                    True,
                )
            return resp, first
    except Failure:
        raise
    except TimeoutError:
        if resp is not None:
            resp.close()
        raise Failure(
            "timeout",
            ProxyError(
                504,
                f"The backend did not answer within {t.first_byte:g} seconds.",
                code="upstream_timeout",
            ),
            True,
        ) from None
    except (aiohttp.ClientConnectionError, OSError) as exc:
        if resp is not None:
            resp.close()
        kind = "connect" if resp is None else "reset"
        raise Failure(
            kind,
            ProxyError(
                502,
                f"The backend is unreachable ({type(exc).__name__}).",
                code="upstream_unreachable",
            ),
            True,
        ) from None
    except aiohttp.ClientPayloadError:
        if resp is not None:
            resp.close()
        raise Failure(
            "reset",
            ProxyError(502, "The backend closed the connection early.", code="upstream_reset"),
            True,
        ) from None


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
        data = json.dumps(ex.body, ensure_ascii=False, separators=(",", ":")).encode()
    else:
        data = ex.raw_body or None
    last: Failure | None = None
    for up in live:
        for attempt in range(1, up.cfg.retries.attempts + 1):
            ex.attempts += 1
            try:
                resp, first = await _open(up, ex, path, data)
            except Failure as failure:
                last = failure
                ex.log.setdefault("failures", []).append(f"{up.name}:{failure.kind}")
                if not failure.retryable:
                    ex.upstream = up.name
                    raise failure.error from None
                if failure.kind != "http_429":  # busy is not broken
                    up.record(False)
                if up.is_open:
                    break
                if attempt < up.cfg.retries.attempts:
                    await asyncio.sleep(_backoff(attempt, up, failure.retry_after))
                continue
            up.record(True)
            ex.upstream = up.name
            ex.response_headers["x-upstream"] = up.name
            if ex.attempts > 1:
                ex.response_headers["x-upstream-attempts"] = str(ex.attempts)
            try:
                return await _relay(ex, up, resp, first, upstreams.keepalive)
            finally:
                # back to the pool when read to the end; closed (and so cancelled at
                # the backend) otherwise
                resp.release()
    assert last is not None
    raise last.error


async def _finish(ex: Exchange) -> None:
    for callback in ex.on_complete:
        try:
            result = callback(ex)
            if result is not None:
                await result
        except Exception:
            log.exception("completion callback failed", extra={"request_id": ex.request_id})


async def _relay(
    ex: Exchange, up: Upstream, resp: aiohttp.ClientResponse, first: bytes, keepalive: float
) -> web.StreamResponse:
    ex.ttfb = time.perf_counter() - ex.started
    ex.status = resp.status
    ctype = resp.headers.get("Content-Type", "application/json")
    if ctype.startswith("text/event-stream"):
        ex.stream = True
        return await _relay_stream(ex, up, resp, first, keepalive)
    t = up.cfg.timeouts
    try:
        async with asyncio.timeout(t.idle):
            rest = await resp.read()
    except (TimeoutError, aiohttp.ClientError, OSError):
        raise ProxyError(
            502, "The backend closed the connection early.", code="upstream_reset"
        ) from None
    body = first + rest
    if ex.needs_parse and ctype.startswith("application/json"):
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            for transform in reversed(ex.body_transforms):
                doc = transform(doc)
            if ex.body_transforms:
                body = json.dumps(doc, ensure_ascii=False).encode()
            ex.completion = doc
    headers = dict(ex.response_headers)
    headers["Content-Type"] = ctype
    out = web.Response(status=resp.status, body=body, headers=headers)
    if ex.on_complete:
        await out.prepare(ex.request)
        await out.write_eof()
        await _finish(ex)
    return out


class ErrorNormaliser:
    """Rewrites backend error events of other shapes into `data: {"error": {...}}`."""

    def on_event(self, event: sse.Event) -> list[sse.Event]:
        other = event.other.get("error") if event.other else None
        if other is None and (event.data is None or "error" not in event.data):
            return [event]
        fixed = normalise_error_payload(event.json(), other)
        if fixed is None:
            return [event]
        return [sse.data_event(fixed)]

    def on_end(self) -> list[sse.Event]:
        return []


class _Transformer:
    """The transformed relay: parse, pass through each transform, re-encode."""

    def __init__(self, ex: Exchange) -> None:
        # responses pass the chain bottom to top: the last registered transform first
        self.transforms: list[EventTransform] = [ErrorNormaliser()]
        self.transforms.extend(reversed(ex.event_transforms))
        self.acc = Accumulator() if ex.on_complete else None
        self.pending = sse.START

    def _through(self, events: list[sse.Event], start: int = 0) -> list[sse.Event]:
        for t in self.transforms[start:]:
            out: list[sse.Event] = []
            for e in events:
                out.extend(t.on_event(e))
            events = out
        return events

    def _emit(self, events: list[sse.Event]) -> bytes:
        if self.acc is not None:
            for e in events:
                if e.data is not None:
                    self.acc.feed(e.json())
        return b"".join(sse.encode(e) for e in events)

    def feed(self, chunk: bytes) -> bytes:
        events, self.pending = sse.parse(self.pending, chunk)
        return self._emit(self._through(events)) if events else b""

    def end(self) -> bytes:
        events = sse.flush(self.pending)
        self.pending = sse.START
        for t in self.transforms:
            out: list[sse.Event] = []
            for e in events:
                out.extend(t.on_event(e))
            out.extend(t.on_end())
            events = out
        return self._emit(events)


async def _relay_stream(
    ex: Exchange, up: Upstream, resp: aiohttp.ClientResponse, first: bytes, keepalive_seconds: float
) -> web.StreamResponse:
    headers = dict(ex.response_headers)
    headers.update(SSE_HEADERS)
    out = web.StreamResponse(status=resp.status, headers=headers)
    await out.prepare(ex.request)
    STREAMS.inc()
    try:
        return await _pump(ex, up, resp, first, keepalive_seconds, out)
    finally:
        STREAMS.dec()


async def _pump(
    ex: Exchange,
    up: Upstream,
    resp: aiohttp.ClientResponse,
    first: bytes,
    keepalive_seconds: float,
    out: web.StreamResponse,
) -> web.StreamResponse:
    keepalive = keepalive_seconds
    idle = up.cfg.timeouts.idle
    tick = min(idle, keepalive) if keepalive else idle
    transformer = _Transformer(ex) if ex.needs_parse else None
    chunk = first
    boundary = True
    silent = 0.0
    try:
        while chunk:
            if transformer is None and boundary and b"error" in chunk:
                # a backend error event may follow: parse from here on to normalise it
                transformer = _Transformer(ex)
            if transformer is None:
                await out.write(chunk)
                boundary = chunk.endswith(_BOUNDARIES)
            else:
                data = transformer.feed(chunk)
                if data:
                    await out.write(data)
                boundary = not transformer.pending.buf
            silent = 0.0
            while True:
                try:
                    async with asyncio.timeout(tick):
                        chunk = await resp.content.readany()
                    break
                except TimeoutError:
                    silent += tick
                    if silent >= idle:
                        raise
                    if boundary:
                        await out.write(b": keepalive\n\n")
        if transformer is not None:
            tail = transformer.end()
            if tail:
                await out.write(tail)
            if transformer.acc is not None:
                ex.completion = transformer.acc.result()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        # the client went away: stop reading from the backend at once
        ex.error = "client_disconnected"
        resp.close()
        return out
    except TimeoutError:
        ex.error = "upstream_idle_timeout"
        await _stream_error(
            out,
            ProxyError(
                504, f"The backend sent nothing for {idle:g} seconds.", code="upstream_timeout"
            ),
        )
        resp.close()
        return out
    except (aiohttp.ClientError, OSError) as exc:
        ex.error = f"upstream_{type(exc).__name__}"
        await _stream_error(
            out,
            ProxyError(
                502, "The backend failed in the middle of the stream.", code="upstream_reset"
            ),
        )
        resp.close()
        return out
    await out.write_eof()
    if ex.on_complete:
        await _finish(ex)
    return out


async def _stream_error(out: web.StreamResponse, err: ProxyError) -> None:
    try:
        await out.write(sse_error_event(err))
        await out.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        pass


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
        if up.session is None or up.is_open:
            continue
        try:
            async with asyncio.timeout(up.cfg.timeouts.first_byte):
                async with up.session.get(
                    up.url("/models", ""), headers=_forward_headers(ex, up)
                ) as resp:
                    body = await resp.read()
                    if resp.status >= 400:
                        errors.append(normalise_backend_error(resp.status, body))
                        continue
                    docs.append(json.loads(body))
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
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
