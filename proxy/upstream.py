"""The terminal handler: the only code that talks to a backend.

It picks the upstream by model (proxy/routing.py), sends the request, retries and
falls back only before the first byte has gone to the client, then hands the answer
to proxy/relay.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from typing import Any

from aiohttp import web

from proxy import jsonfast
from proxy.errors import ProxyError, normalise_backend_error
from proxy.exchange import Exchange
from proxy.http1 import ClientError, Disconnected, Response
from proxy.relay import relay
from proxy.routing import Upstream, Upstreams

__all__ = ["Upstream", "Upstreams", "handle", "list_models"]

log = logging.getLogger("chat_proxy.upstream")

# request headers never forwarded: hop-by-hop ones, the client's credentials, and
# those the proxy sets itself
NEVER_FORWARDED = frozenset(
    {
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
        "expect",
        "x-request-id",
    }
)
# ... and, when the proxy writes the JSON body itself, the client's Content-Type
_NEVER_WITH_BODY = NEVER_FORWARDED | {"content-type"}


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


_OWN_ID = re.compile(r"^req_([0-9a-f]{1,32})$")


def upstream_request_id(request_id: str) -> str:
    """The X-Request-Id sent to the backend. The proxy's own ids (`req_` and 32 hex
    digits) go as their digits, which parse as a UUID, as llama-cpp-python's server
    demands (it answers any other value with an empty 400); a client's own id goes as
    it came."""
    own = _OWN_ID.match(request_id)
    return own.group(1).rjust(32, "0") if own else request_id


def _forward_headers(ex: Exchange, up: Upstream) -> list[tuple[str, str]]:
    """The client's headers less those never forwarded and those the proxy sets."""
    extra = ex.upstream_headers
    drop = _NEVER_WITH_BODY if ex.body is not None else NEVER_FORWARDED
    more = ex.upstream_drop_headers
    if extra:
        more = more | {k.lower() for k in extra}
    if more:
        headers = [
            (k, v)
            for k, v in ex.request.headers.items()
            if (lk := k.lower()) not in drop and lk not in more
        ]
    else:
        headers = [(k, v) for k, v in ex.request.headers.items() if k.lower() not in drop]
    headers.append(("X-Request-Id", upstream_request_id(ex.request_id)))
    if extra:
        headers.extend(extra.items())
    headers.extend(up.auth)
    if ex.body is not None:
        headers.append(("Content-Type", "application/json"))
    return headers


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
    up: Upstream, ex: Exchange, target: str, data: bytes | None
) -> tuple[Response, bytes]:
    """Send the request; return the answer and its first bytes, or raise Failure."""
    assert up.pool is not None
    t = up.cfg.timeouts
    loop = up.pool.loop
    deadline = loop.time() + t.first_byte
    resp: Response | None = None
    try:
        resp = await up.pool.request(
            ex.request.method,
            target,
            _forward_headers(ex, up),
            data,
            timeout=t.first_byte,
        )
        if resp.status >= 400:
            body = await resp.read(max(deadline - loop.time(), 0.001))
            resp.release()
            raise _http_failure(up, resp, body)
        first = await resp.read_chunk(max(deadline - loop.time(), 0.001))
        if not first and resp.headers.get("content-type", "").startswith("text/event-stream"):
            # and never reuse the connection: the backend (llama-cpp-python) closes it next
            resp.close()
            raise Failure(
                "empty",
                ProxyError(
                    502,
                    "The backend ended the stream without sending anything.",
                    code="upstream_empty",
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
    except Disconnected:
        # most often a pooled keep-alive connection the backend had just closed
        raise Failure(
            "stale",
            ProxyError(
                502,
                "The backend closed the connection without answering.",
                code="upstream_unreachable",
            ),
            True,
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
            True,
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
            True,
        ) from None
    except BaseException:
        if resp is not None:
            resp.close()
        raise


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
    last: Failure | None = None
    stale_retried = False
    for up in live:
        attempt = 0
        while attempt < up.cfg.retries.attempts:
            attempt += 1
            ex.attempts += 1
            try:
                resp, first = await _open(
                    up, ex, up.target(path, ex.request.rel_url.raw_query_string), data
                )
            except Failure as failure:
                if failure.kind == "stale" and not stale_retried:
                    # the backend had just closed an idle pooled connection: once more,
                    # at once, without counting it as an attempt
                    stale_retried = True
                    attempt -= 1
                    continue
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
                return await relay(ex, up, resp, first, upstreams.keepalive)
            finally:
                # back to the pool when read to the end; closed (and so cancelled at
                # the backend) otherwise
                resp.release()
    assert last is not None
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
        if up.pool is None or up.is_open:
            continue
        timeout = up.cfg.timeouts.first_byte
        try:
            resp = await up.pool.request(
                "GET", up.target("/models", ""), _forward_headers(ex, up), None, timeout=timeout
            )
            try:
                body = await resp.read(timeout)
            finally:
                resp.release()
            if resp.status >= 400:
                errors.append(normalise_backend_error(resp.status, body))
                continue
            docs.append(jsonfast.loads(body))
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
