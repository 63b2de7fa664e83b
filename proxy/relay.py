"""The response side of the relay: raw bytes as they arrive, or parsed, transformed
and re-encoded events where a middleware must change them."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import aiohttp
from aiohttp import web

from proxy import jsonfast, sse
from proxy.backend import BackendResponse as Response
from proxy.backend import BodyTooLarge, ClientError
from proxy.encoding import CannotDecode, Decoder, content_encoding, decode_whole, undecodable
from proxy.errors import ProxyError, sse_error_event
from proxy.exchange import Exchange
from proxy.inbound import ClientConnection
from proxy.metrics import STREAMS
from proxy.routing import Upstream
from proxy.transform import CONTENT_TOKEN, MAX_EVENT_BYTES, EventTooLarge, StreamTransformer

log = logging.getLogger("chat_proxy.upstream")

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_BOUNDARIES = (b"\n\n", b"\r\r", b"\r\n\r\n")


async def _finish(ex: Exchange) -> None:
    # responses pass the chain bottom to top: the last registered callback first
    for callback in reversed(ex.on_complete):
        try:
            result = callback(ex)
            if result is not None:
                await result
        except Exception:
            log.exception("completion callback failed", extra={"request_id": ex.request_id})


async def relay(
    ex: Exchange,
    up: Upstream,
    resp: Response,
    first: bytes,
    keepalive: float,
    max_response: int,
    decoder: Decoder | None = None,
) -> web.StreamResponse:
    """Send the backend's answer on: a stream event by event, a body that a middleware
    must read whole (at most `max_response` bytes), any other body as it arrives.
    `decoder`: a stream's Content-Encoding, already applied to `first`."""
    ex.ttfb = time.perf_counter() - ex.started
    ex.status = resp.status
    ctype = resp.headers.get("content-type", "application/json")
    if ctype.startswith("text/event-stream"):
        ex.stream = True
        out = await _open_stream(ex, resp)
        STREAMS.inc()
        try:
            return await _pump(ex, up, resp, first, keepalive, out, decoder)
        finally:
            STREAMS.dec()
    ex.first_token = ex.ttfb
    if ex.stream_opener is not None and not ex.stream_opener.claim_body():
        # the client has an event stream already (a filler): a body cannot follow it
        raise ProxyError(
            502,
            "The backend answered a streamed request with a body, not an event stream.",
            code="upstream_bad_response",
        )
    if not (ex.needs_parse and ctype.startswith("application/json")):
        return await _pass_body(ex, up, resp, first, ctype)
    idle = up.cfg.timeouts.idle
    try:
        # the whole body most often came in the first read
        body = first if resp.complete else first + await resp.read(idle, max_response - len(first))
    except BodyTooLarge:  # before ClientError, of which it is one
        raise ProxyError(
            502,
            f"The backend's answer is larger than {max_response} bytes "
            "(server.max_response_bytes).",
            code="upstream_too_large",
        ) from None
    except (TimeoutError, ClientError, OSError):
        raise ProxyError(
            502, "The backend closed the connection early.", code="upstream_reset"
        ) from None
    encoding = content_encoding(resp.headers)
    plain = body
    if encoding is not None:
        try:
            plain = decode_whole(body, encoding, max_response)
        except CannotDecode as exc:
            raise undecodable(exc) from None
    parse = True
    if ex.body_transforms:
        doc = _json_object(plain)
        if doc is not None:
            for transform in reversed(ex.body_transforms):
                doc = transform(doc)
            body = jsonfast.dumps(doc)
            encoding = None  # re-encoded: sent as it is
            ex.completion = doc
        parse = False
    if ex.output is not None:
        doc = ex.completion if not parse else _json_object(plain)
        if doc is None:
            raise ProxyError(
                502, "The backend's answer is not a JSON object.", code="upstream_bad_response"
            )
        ex.completion = doc
        body = jsonfast.dumps(ex.output.body(doc))
        encoding = None
        parse = False
    headers = dict(ex.response_headers)
    headers["Content-Type"] = ctype
    if encoding is not None:
        headers["Content-Encoding"] = resp.headers["content-encoding"]
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
        ex.completion = _json_object(plain)
    if ex.on_complete and not gone:
        await _finish(ex)
    return out


async def _pass_body(
    ex: Exchange, up: Upstream, resp: Response, first: bytes, ctype: str
) -> web.StreamResponse:
    """A body no middleware reads: sent on as it arrives (its size bounds nothing in
    the proxy), with its Content-Encoding."""
    headers = dict(ex.response_headers)
    headers["Content-Type"] = ctype
    encoding = resp.headers.get("content-encoding")
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    if resp.complete:
        out: web.StreamResponse = web.Response(status=resp.status, body=first, headers=headers)
        try:
            await out.prepare(ex.request)
            await out.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            ex.error = "client_disconnected"
            return out
        if ex.on_complete:
            await _finish(ex)
        return out
    out = web.StreamResponse(status=resp.status, headers=headers)
    length = resp.headers.get("content-length")
    if length is not None and length.isdigit():
        out.content_length = int(length)
    idle = up.cfg.timeouts.idle
    await out.prepare(ex.request)
    chunk = first
    try:
        while chunk:
            await out.write(chunk)
            chunk = await resp.read_chunk(idle)
        await out.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        ex.error = "client_disconnected"
        resp.close()
        return out
    except (TimeoutError, ClientError, OSError) as exc:
        # the status has gone: the client must see a body cut short, never one that
        # looks whole, so its connection is cut
        ex.error = "upstream_idle_timeout" if isinstance(exc, TimeoutError) else "upstream_reset"
        resp.close()
        transport = ex.request.transport
        if transport is not None:
            transport.abort()
        return out
    if ex.on_complete:
        await _finish(ex)
    return out


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        doc = jsonfast.loads(body)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


async def _open_stream(ex: Exchange, resp: Response) -> web.StreamResponse:
    """The client's event stream, started (its status and headers sent). A coroutine
    of its own so that nothing of the opening (the headers built) stays alive in a
    frame for the stream's life; and the client connection's timers for a head or
    an idle connection are stopped until the stream ends."""
    headers = dict(ex.response_headers)
    headers.update(SSE_HEADERS)
    if ex.stream_opener is not None:
        out = await ex.stream_opener.open(resp.status, headers)
    else:
        out = web.StreamResponse(status=resp.status, headers=headers)
        await out.prepare(ex.request)
    protocol = ex.request.protocol
    if isinstance(protocol, ClientConnection):
        protocol.streaming()
    return out


# a finish_reason with a value, as JSON encoders write it
_FINISH = b'"finish_reason":"'
_FINISH_SPACED = b'"finish_reason": "'
_DONE_AT_END = re.compile(rb"(?:^|[\r\n])data: ?\[DONE\][\r\n]*\Z")


def _choices(ex: Exchange) -> int:
    n = ex.body.get("n") if ex.body is not None else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


async def _pump(
    ex: Exchange,
    up: Upstream,
    resp: Response,
    first: bytes,
    keepalive_seconds: float,
    out: web.StreamResponse,
    decoder: Decoder | None,
) -> web.StreamResponse:
    keepalive = keepalive_seconds
    idle = up.cfg.timeouts.idle
    tick = min(idle, keepalive) if keepalive else idle
    transformer = StreamTransformer(ex) if ex.needs_parse else None
    chunk = first
    boundary = True
    silent = 0.0
    # how the raw relay tells a stream that ended from one cut short: the end of the
    # last read and, when that read is short, the end of the one before (for
    # `[DONE]`; no whole earlier read kept alive), and the finish_reasons seen
    last = before = b""
    finishes = 0
    try:
        while chunk:
            if transformer is None and boundary and b"error" in chunk:
                # a backend error event may follow: parse from here on to normalise it
                transformer = StreamTransformer(ex)
            if transformer is None:
                await out.write(chunk)
                if ex.first_token is None and CONTENT_TOKEN.search(chunk):
                    ex.first_token = time.perf_counter() - ex.started
                boundary = chunk.endswith(_BOUNDARIES)
                if b"finish_reason" in chunk:
                    finishes += chunk.count(_FINISH) + chunk.count(_FINISH_SPACED)
                before = last[-64:] if len(chunk) < 128 else b""
                last = chunk
            else:
                data = transformer.feed(chunk)
                if data:
                    await out.write(data)
                    data = b""  # not kept while the next read waits
                boundary = not transformer.pending.buf
            silent = 0.0
            while True:
                try:
                    chunk = await resp.read_chunk(tick)
                except TimeoutError:
                    silent += tick
                    if silent >= idle:
                        raise
                    if boundary:
                        await out.write(b": keepalive\n\n")
                    continue
                if decoder is not None:
                    if chunk:
                        chunk = decoder.feed(chunk)
                        if not chunk:
                            continue  # the decoder waits for more
                    else:
                        chunk = decoder.end()
                        decoder = None
                break
        if transformer is not None:
            tail = transformer.end()
            if tail:
                await out.write(tail)
            if transformer.acc is not None:
                ex.completion = transformer.acc.result()
            ended = transformer.done or len(transformer.finished) + finishes >= _choices(ex)
            if transformer.failed:
                ex.incomplete = True
                ended = True  # the backend said why: its error event went on
        else:
            ended = bool(_DONE_AT_END.search((before[-64:] + last)[-128:])) or (
                finishes >= _choices(ex)
            )
        if not ended:
            ex.incomplete = True
            ex.error = "upstream_truncated"
            await out.write(
                _error_bytes(
                    ex,
                    ProxyError(
                        502,
                        "The backend ended the stream before it was complete "
                        "(no finish_reason and no [DONE]).",
                        code="upstream_truncated",
                    ),
                )
            )
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        # the client went away: stop reading from the backend at once
        ex.error = "client_disconnected"
        resp.close()
        return out
    except TimeoutError:
        ex.error = "upstream_idle_timeout"
        await _stream_error(
            ex,
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
            ex,
            out,
            ProxyError(
                502,
                f"The backend sent an event larger than {MAX_EVENT_BYTES // 1048576} MiB.",
                code="upstream_bad_response",
            ),
        )
        resp.close()
        return out
    except CannotDecode as exc:
        ex.error = "upstream_bad_response"
        await _stream_error(ex, out, undecodable(exc))
        resp.close()
        return out
    except (ClientError, OSError) as exc:
        ex.error = f"upstream_{type(exc).__name__}"
        await _stream_error(
            ex,
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
            ex,
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


def _error_bytes(ex: Exchange, err: ProxyError) -> bytes:
    """A failure in the middle of a stream, as the client's API says it."""
    if ex.output is not None:
        return b"".join(sse.encode(e) for e in ex.output.error(err))
    return sse_error_event(err)


async def _stream_error(ex: Exchange, out: web.StreamResponse, err: ProxyError) -> None:
    try:
        await out.write(_error_bytes(ex, err))
        await out.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        pass
