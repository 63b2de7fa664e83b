"""One attempt at a backend: send the request, wait for its first byte (for a stream:
its first event with a field), and say how a failure happened, so that the caller
knows whether the request may go again (only when it surely never arrived).
"""

from __future__ import annotations

import errno
import logging
import random

from proxy import sse, tracing
from proxy.backend import BackendResponse as Response
from proxy.backend import BodyTooLarge, ClientError, ConnectTimeout, Disconnected, PoolFull
from proxy.capacity import open_file_limit, warn_limit
from proxy.encoding import CannotDecode, Decoder, content_encoding, undecodable
from proxy.errors import ProxyError, normalise_backend_error
from proxy.exchange import Exchange
from proxy.forward import forward_headers
from proxy.routing import Replica, Upstream
from proxy.transform import MAX_EVENT_BYTES

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


def backoff(attempt: int, up: Upstream, retry_after: float | None) -> float:
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


async def open_answer(
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
    except PoolFull as exc:
        # every connection in use: the request never left, and may go elsewhere
        warn_limit(
            f"pool:{up.name}",
            "every connection of the upstream's pool is in use: requests are refused",
            upstream=up.name,
            max_connections=exc.limit,
            waited_seconds=round(exc.waited, 3),
        )
        raise Failure(
            "pool_full",
            ProxyError(
                503,
                f"All {exc.limit} connections to the backend are in use (the upstream's "
                f"max_connections) and none came free within {exc.waited:.3g} seconds.",
                code="upstream_pool_full",
                headers={"Retry-After": "1", "retry-after-ms": "1000"},
            ),
            True,
        ) from None
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
        if resp is None and exc.errno in (errno.EMFILE, errno.ENFILE):
            # the proxy's own limit, not the backend's fault
            files = open_file_limit()
            warn_limit(
                "open_files",
                "the open-file limit is reached: no connection to the backend could be opened",
                upstream=up.name,
                open_files=files,
            )
            raise Failure(
                "open_files",
                ProxyError(
                    503,
                    f"The proxy has reached its open-file limit ({files}) and could not "
                    "open a connection to the backend.",
                    code="open_file_limit",
                    headers={"Retry-After": "1", "retry-after-ms": "1000"},
                ),
                True,
            ) from None
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


async def traced_open(
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


def failed(ex: Exchange, up: Upstream, replica: Replica, failure: Failure) -> None:
    """A failed attempt, for the access line, the metrics and the replica's circuit."""
    where = f"{up.name}/{replica.index}" if up.fleet else up.name
    ex.failures.append(f"{where}:{failure.kind}")
    if failure.kind in ("pool_full", "open_files"):
        pass  # the proxy's own limits: the replica is not at fault
    elif failure.kind != "http_429" and (failure.retryable or not failure.kind.startswith("http_")):
        replica.record(False)  # busy is not broken, and a 4xx is the client's
