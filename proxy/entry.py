"""The request's way in: every proxied request is read, routed and parsed here once,
then handed to the chain; errors are mapped to the OpenAI shape and one access line
is written."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
from typing import Any

from aiohttp import web

from proxy import forms, inbound, jsonfast, metrics, paths, tracing
from proxy.dialects import elevenlabs
from proxy.errors import ProxyError, bad_request
from proxy.exchange import Exchange
from proxy.observability import access_log, clean_request_id, current_request_id, write_access_line
from proxy.responses import api as responses_api
from proxy.routes import CHAT, PASSTHROUGH, UNKNOWN
from proxy.runtime import IPNetwork, Runtime, State

log = logging.getLogger("chat_proxy")

_BODY_METHODS = ("POST", "PUT", "PATCH")


def forwarded_client(request: web.Request, trusted: tuple[IPNetwork, ...]) -> str | None:
    """The client's address from X-Forwarded-For when the peer is a trusted balancer:
    the right-most address that is not itself trusted (a client may write anything at
    the left of the header). None: the peer's own address stands."""

    def is_trusted(addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in trusted)

    peer = request.remote
    if peer is None or not is_trusted(peer):
        return None
    hops = [h.strip() for v in request.headers.getall("X-Forwarded-For", ()) for h in v.split(",")]
    for hop in reversed(hops):
        if not hop:
            continue
        if not is_trusted(hop):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return None  # garbage in the header: the balancer's address stands
    return None


MAX_JSON_DEPTH = 128  # well below the recursion limit, whatever walks the body later
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _json_depth_over(doc: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, (dict, list)))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    return False


def parse_json(raw: bytes) -> Any:
    try:
        doc = jsonfast.loads(raw)
    except (ValueError, RecursionError):
        raise bad_request(
            "We could not parse the JSON body of your request. Send a valid JSON object.",
            code="invalid_json",
        ) from None
    # a body this deep would exhaust the recursion limit of code that walks it later
    brackets = raw.count(b"[") + raw.count(b"{")
    if brackets > MAX_JSON_DEPTH and _json_depth_over(doc, MAX_JSON_DEPTH):
        raise bad_request(
            f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.",
            code="invalid_json",
        )
    # `\ud800` alone parses to a string that cannot be encoded to send it on
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request(
                "The JSON body holds an unpaired UTF-16 surrogate escape (such as \\ud800); "
                "strings must be valid Unicode.",
                code="invalid_json",
            ) from None
    return doc


async def _read(ex: Exchange, rt: Runtime) -> None:
    """Read and parse the body: JSON whatever the Content-Type says (no body reaches
    a backend without the chain having seen its model), or a multipart form."""
    request = ex.request
    if request.headers.get("Expect", "").lower() == "100-continue":
        # the key is checked before the client is asked for its body
        for check in rt.before_body:
            check(ex)
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    server = rt.config.server
    raw = await inbound.read_body(request, server.max_body_bytes, server.timeouts.body)
    ex.raw_body = raw
    route = ex.route
    if route is CHAT or (raw and (route is PASSTHROUGH or route.terminal is not None)):
        ctype = request.headers.get("Content-Type", "")
        if route is PASSTHROUGH and forms.is_form(ctype):
            ex.form = True
            ex.requested_model = forms.model_field(ctype, raw)
            return
        doc = parse_json(raw)
        if not isinstance(doc, dict):
            raise bad_request("The request body must be a JSON object.", code="invalid_json")
        ex.body = doc
        model = doc.get("model")
        ex.requested_model = model if isinstance(model, str) else None
        if route is CHAT:
            elevenlabs.apply(ex)
        elif route is PASSTHROUGH and ex.upstream_path == "/responses" and request.method == "POST":
            await responses_api.apply(ex, rt)


async def handle(request: web.Request, state: State) -> web.StreamResponse:
    """Every proxied request: parse once, run the chain, map errors, log one line."""
    rt = state.runtime
    rid = clean_request_id(request.headers.get("X-Request-Id"))
    current_request_id.set(rid)
    ex = Exchange(request=request, route=UNKNOWN, scope=None, request_id=rid)
    ex.response_headers["X-Request-Id"] = rid
    if rt.trusted:
        ex.remote = forwarded_client(request, rt.trusted)
    rt.in_flight += 1
    tracer = tracing.TRACING
    if tracer is not None:
        ex.span = tracer.server_span(request.headers)
        # the span's usage and finish reasons: the answer is read as it passes
        ex.on_complete.append(_traced)
    response: web.StreamResponse | None = None
    try:
        if state.draining:
            raise ProxyError(
                503,
                "The proxy is shutting down; retry on another replica.",
                code="shutting_down",
                headers={"Connection": "close", "Retry-After": "1"},
            )
        ex.route, ex.scope, ex.upstream_path = rt.routes.classify(
            request.method, paths.normalise(request.path)
        )
        if request.method in _BODY_METHODS:
            await _read(ex, rt)
        response = await rt.handler(ex)
        if not ex.status:
            ex.status = response.status
        if not response.prepared and "Server-Timing" not in response.headers:
            response.headers["Server-Timing"] = tracing.server_timing(ex)
        return response
    except ProxyError as err:
        ex.status = err.status
        ex.error = err.code or err.type
        if isinstance(ex.output, responses_api.ResponsesOutput):
            err.param = responses_api.responses_param(err.param)
        headers = ex.response_headers
        if "Server-Timing" not in headers:
            headers["Server-Timing"] = tracing.server_timing(ex)
        response = err.response(headers)
        if ex.raw_body is None and request.method in _BODY_METHODS:
            # the body was never read: it must not be taken for the next request
            response.force_close()
        return response
    except asyncio.CancelledError:
        ex.status = ex.status or 499
        ex.error = "client_disconnected"
        raise
    except Exception:
        log.exception("unhandled error", extra={"request_id": rid})
        ex.status = 500
        ex.error = "internal"
        fault = ProxyError(500, "The proxy failed to handle this request.", code="internal_error")
        response = fault.response({"X-Request-Id": rid})
        return response
    finally:
        rt.in_flight -= 1
        metrics.observe(ex)
        if ex.span is not None:
            tracing.finish(ex)
        _access(ex)


def _traced(ex: Exchange) -> None:
    """Nothing to do: registered so that the answer is parsed for the span."""


def _access(ex: Exchange) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {
        "request_id": ex.request_id,
        "method": ex.request.method,
        "path": ex.request.path,
        "status": ex.status,
        "key_id": ex.identity.id if ex.identity is not None else None,
        "model": ex.model,
        "requested_model": ex.requested_model,
        "stream": ex.stream,
        "latency_ms": round(ex.elapsed_ms(), 2),
        "ttfb_ms": round(ex.ttfb * 1000, 2) if ex.ttfb is not None else None,
        "first_token_ms": round(ex.first_token * 1000, 2) if ex.first_token is not None else None,
        "upstream": ex.upstream,
        "attempts": ex.attempts,
    }
    if ex.replica is not None:
        fields["replica"] = ex.replica
    if ex.queue_ms is not None:
        fields["queue_ms"] = round(ex.queue_ms, 1)
    if ex.session_id:
        fields["session_id"] = ex.session_id
    if ex.error:
        fields["error"] = ex.error
    if ex.failures:
        fields["failures"] = ex.failures
    if ex.rate_limited is not None:
        fields["rate_limited"] = ex.rate_limited
    if ex.rate_limit_store_down:
        fields["rate_limit_store"] = "unreachable"
    if ex.session_source is not None:
        fields["session_source"] = ex.session_source
    if ex.dropped_params:
        fields["dropped_params"] = ex.dropped_params
    if ex.tool_calls_rewritten:
        fields["tool_calls_rewritten"] = ex.tool_calls_rewritten
    if ex.incomplete:
        fields["incomplete"] = True
    fields.update(ex.log)
    if not write_access_line(fields):
        access_log.info("request", extra=fields)
