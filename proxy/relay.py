"""The response side of the relay: raw bytes as they arrive, or parsed, transformed
and re-encoded events where a middleware must change them."""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from proxy import jsonfast, sse
from proxy.completion import Accumulator
from proxy.errors import ProxyError, normalise_error_payload, sse_error_event
from proxy.exchange import EventTransform, Exchange
from proxy.http1 import ClientError, Response
from proxy.metrics import STREAMS
from proxy.routing import Upstream

log = logging.getLogger("chat_proxy.upstream")

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_BOUNDARIES = (b"\n\n", b"\r\r", b"\r\n\r\n")

# the largest event a parsed stream holds while waiting for its end (a backend that
# never ends a line would otherwise grow the buffer without bound)
MAX_EVENT_BYTES = 16 * 1024 * 1024


class EventTooLarge(Exception):
    """A backend event grew past MAX_EVENT_BYTES without ending."""


async def _finish(ex: Exchange) -> None:
    for callback in ex.on_complete:
        try:
            result = callback(ex)
            if result is not None:
                await result
        except Exception:
            log.exception("completion callback failed", extra={"request_id": ex.request_id})


async def relay(
    ex: Exchange, up: Upstream, resp: Response, first: bytes, keepalive: float
) -> web.StreamResponse:
    ex.ttfb = time.perf_counter() - ex.started
    ex.status = resp.status
    ctype = resp.headers.get("content-type", "application/json")
    if ctype.startswith("text/event-stream"):
        ex.stream = True
        return await _relay_stream(ex, up, resp, first, keepalive)
    try:
        # the whole body most often came in the first read
        rest = b"" if resp.complete else await resp.read(up.cfg.timeouts.idle)
    except (TimeoutError, ClientError, OSError):
        raise ProxyError(
            502, "The backend closed the connection early.", code="upstream_reset"
        ) from None
    body = first + rest
    parse = ex.needs_parse and ctype.startswith("application/json")
    if parse and ex.body_transforms:
        doc = _json_object(body)
        if doc is not None:
            for transform in reversed(ex.body_transforms):
                doc = transform(doc)
            body = jsonfast.dumps(doc)
            ex.completion = doc
        parse = False
    headers = dict(ex.response_headers)
    headers["Content-Type"] = ctype
    out = web.Response(status=resp.status, body=body, headers=headers)
    # sent now, so that what runs after (parsing the answer for the bookkeeping, the
    # middlewares' work on the way back, metrics, the access line) does not delay
    # the client
    gone = False
    try:
        await out.prepare(ex.request)
        await out.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        ex.error = "client_disconnected"
        gone = True
    if parse:
        ex.completion = _json_object(body)
    if ex.on_complete and not gone:
        await _finish(ex)
    return out


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        doc = jsonfast.loads(body)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


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
        # reads inside one unfinished line, joined once its end comes (not re-parsed
        # read after read)
        self._held: list[bytes] = []
        self._held_size = 0

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

    def _usage(self, events: list[sse.Event]) -> None:
        # usage belongs to the backend's answer even where a middleware hides it from
        # the client (rate_limit asks for it on the client's behalf)
        if self.acc is None:
            return
        for e in events:
            if e.data is not None and '"usage"' in e.data:
                doc = e.json()
                usage = doc.get("usage") if isinstance(doc, dict) else None
                if isinstance(usage, dict):
                    self.acc.usage = usage

    def _with_held(self, chunk: bytes) -> bytes:
        """The held reads and `chunk`, as one; nothing is held after."""
        if not self._held:
            return chunk
        data = b"".join([*self._held, chunk])
        self._held.clear()
        self._held_size = 0
        return data

    def feed(self, chunk: bytes) -> bytes:
        if self.pending.buf and b"\n" not in chunk and b"\r" not in chunk:
            self._held.append(chunk)
            self._held_size += len(chunk)
            if len(self.pending.buf) + self._held_size > MAX_EVENT_BYTES:
                raise EventTooLarge()
            return b""
        events, self.pending = sse.parse(self.pending, self._with_held(chunk))
        if len(self.pending.buf) > MAX_EVENT_BYTES:
            raise EventTooLarge()
        if not events:
            return b""
        self._usage(events)
        return self._emit(self._through(events))

    def end(self) -> bytes:
        if self._held:
            held = self._with_held(b"")
            self.pending = sse.Pending(self.pending.buf + held, self.pending.after_cr)
        events = sse.flush(self.pending)
        self.pending = sse.START
        self._usage(events)
        for t in self.transforms:
            out: list[sse.Event] = []
            for e in events:
                out.extend(t.on_event(e))
            out.extend(t.on_end())
            events = out
        return self._emit(events)


async def _relay_stream(
    ex: Exchange, up: Upstream, resp: Response, first: bytes, keepalive_seconds: float
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
    resp: Response,
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
                    chunk = await resp.read_chunk(tick)
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
    except EventTooLarge:
        ex.error = "upstream_event_too_large"
        await _stream_error(
            out,
            ProxyError(
                502,
                f"The backend sent an event larger than {MAX_EVENT_BYTES // 1048576} MiB.",
                code="upstream_bad_response",
            ),
        )
        resp.close()
        return out
    except (ClientError, OSError) as exc:
        ex.error = f"upstream_{type(exc).__name__}"
        await _stream_error(
            out,
            ProxyError(
                502, "The backend failed in the middle of the stream.", code="upstream_reset"
            ),
        )
        resp.close()
        return out
    except Exception:
        # the response has started: a 500 can no longer be sent, so end the stream
        # with an error event rather than leave the client waiting
        log.exception("stream relay failed", extra={"request_id": ex.request_id})
        ex.error = "internal"
        await _stream_error(
            out,
            ProxyError(
                500, "The proxy failed to relay the rest of the stream.", code="internal_error"
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
