"""build_app(config) -> web.Application: routes, the chain, and the lifecycle."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy import forms, inbound, jsonfast, memory, metrics, paths, upstream
from proxy.chain import BuildContext, build_middlewares, compose
from proxy.config import LoadedConfig
from proxy.errors import ProxyError, bad_request, install_http_error_shape, not_found
from proxy.exchange import Exchange, Handler
from proxy.observability import (
    access_log,
    clean_request_id,
    current_request_id,
    write_access_line,
)

log = logging.getLogger("chat_proxy")


@dataclass
class Runtime:
    """Everything a request needs, swapped whole on reload."""

    config: LoadedConfig
    upstreams: upstream.Upstreams
    handler: Handler
    ctx: BuildContext
    middleware_names: list[str] = field(default_factory=list)
    in_flight: int = 0
    trusted: tuple[IPNetwork, ...] = ()


@dataclass
class State:
    runtime: Runtime
    draining: bool = False
    in_flight: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


STATE = web.AppKey("chat_proxy_state", State)

_CHAT_PATHS = {"/v1/chat/completions", "/chat/completions"}
_MODELS_PATHS = {"/v1/models", "/models"}


def classify(method: str, path: str) -> tuple[str, str | None, str]:
    """(route, scope, upstream path) for a request, or raise 404/405."""
    if path in _CHAT_PATHS:
        if method != "POST":
            raise ProxyError(
                405,
                f"Method {method} is not allowed on {path}; use POST.",
                code="method_not_allowed",
            )
        return "chat", "chat", "/chat/completions"
    if path in _MODELS_PATHS:
        if method != "GET":
            raise ProxyError(
                405,
                f"Method {method} is not allowed on {path}; use GET.",
                code="method_not_allowed",
            )
        return "models", "models", "/models"
    if path == "/v1/sessions" or path.startswith("/v1/sessions/"):
        scope = "sessions:write" if method == "DELETE" else "sessions:read"
        return "sessions", scope, path
    if path.startswith("/v1/"):
        return "passthrough", "chat", path[3:]
    raise not_found(f"Unknown path {path}.")


def _terminal(runtime_ref: list[Runtime]) -> Handler:
    async def terminal(ex: Exchange) -> web.StreamResponse:
        rt = runtime_ref[0]
        if ex.route == "models":
            return await upstream.list_models(ex, rt.upstreams)
        if ex.route == "sessions":
            api = rt.ctx.services.get("sessions_api")
            if api is None:
                raise not_found("Sessions are not enabled on this proxy.")
            response: web.StreamResponse = await api(ex)
            return response
        body = ex.body
        if ex.route == "chat" and body is not None:
            # fields a backend would refuse, whether or not `validate` runs
            if "elevenlabs_extra_body" in body:
                ex.extra.setdefault("elevenlabs_extra_body", body.pop("elevenlabs_extra_body"))
            if "user_id" in body:
                user_id = body.pop("user_id")
                if isinstance(user_id, str) and "user" not in body:
                    body["user"] = user_id
        identity = ex.identity
        if (
            identity is not None
            and (body is not None or ex.form)
            and not identity.may_use(ex.model)
        ):
            raise ProxyError(
                403,
                f"The key '{identity.id}' may not use the model `{ex.model}`."
                if ex.model
                else f"The key '{identity.id}' must name a model it may use.",
                param="model",
                code="model_not_allowed",
            )
        return await upstream.handle(ex, rt.upstreams, ex.log.pop("_path"))

    return terminal


async def build_runtime(
    config: LoadedConfig, store: Any = None, previous: Runtime | None = None
) -> Runtime:
    """Build the chain and the upstreams for a configuration (not yet started);
    `previous` is the runtime it replaces on a reload."""
    ctx = BuildContext(
        config=config, store=store, previous=previous.ctx.services if previous else {}
    )
    middlewares = build_middlewares(ctx)
    ref: list[Runtime] = []
    handler = compose(middlewares, _terminal(ref))
    ups = upstream.Upstreams(config.upstreams)
    ups.keepalive = config.server.keepalive_seconds
    ups.max_response_bytes = config.server.max_response_bytes
    rt = Runtime(
        config=config,
        upstreams=ups,
        handler=handler,
        ctx=ctx,
        middleware_names=[n for n, _ in middlewares],
    )
    rt.trusted = tuple(ipaddress.ip_network(n, strict=False) for n in config.server.trusted_proxies)
    ref.append(rt)
    return rt


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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


async def start_runtime(rt: Runtime) -> None:
    await rt.upstreams.start()
    for hook in rt.ctx.startup:
        await hook()


async def stop_runtime(rt: Runtime) -> None:
    for hook in reversed(rt.ctx.shutdown):
        try:
            await hook()
        except Exception:
            log.exception("shutdown hook failed")
    await rt.upstreams.close()


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


def _parse_json(raw: bytes) -> Any:
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


async def entry(request: web.Request) -> web.StreamResponse:
    """Every proxied request: parse once, run the chain, map errors, log one line."""
    state = request.app[STATE]
    rt = state.runtime
    rid = clean_request_id(request.headers.get("X-Request-Id"))
    current_request_id.set(rid)
    ex = Exchange(request=request, route="", scope=None, request_id=rid)
    ex.response_headers["X-Request-Id"] = rid
    if rt.trusted:
        ex.remote = forwarded_client(request, rt.trusted)
    state.in_flight += 1
    rt.in_flight += 1
    response: web.StreamResponse | None = None
    try:
        if state.draining:
            raise ProxyError(
                503,
                "The proxy is shutting down; retry on another replica.",
                code="shutting_down",
                headers={"Connection": "close", "Retry-After": "1"},
            )
        ex.route, ex.scope, path = classify(request.method, paths.normalise(request.path))
        ex.log["_path"] = path
        if request.method in ("POST", "PUT", "PATCH"):
            if request.headers.get("Expect", "").lower() == "100-continue":
                # the key is checked before the client is asked for its body
                for check in rt.ctx.before_body:
                    check(ex)
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            raw = await inbound.read_body(
                request, rt.config.server.max_body_bytes, rt.config.server.timeouts.body
            )
            ex.raw_body = raw
            if ex.route == "chat" or (ex.route == "passthrough" and raw):
                ctype = request.headers.get("Content-Type", "")
                if ex.route == "passthrough" and forms.is_form(ctype):
                    ex.form = True
                    ex.requested_model = forms.model_field(ctype, raw)
                else:
                    # whatever the Content-Type says: no body reaches a backend
                    # without the chain having seen its model
                    doc = _parse_json(raw)
                    if not isinstance(doc, dict):
                        raise bad_request(
                            "The request body must be a JSON object.", code="invalid_json"
                        )
                    ex.body = doc
                    model = doc.get("model")
                    ex.requested_model = model if isinstance(model, str) else None
        response = await rt.handler(ex)
        if not ex.status:
            ex.status = response.status
        return response
    except ProxyError as err:
        ex.status = err.status
        ex.error = err.code or err.type
        response = err.response(ex.response_headers)
        if ex.raw_body is None and request.method in ("POST", "PUT", "PATCH"):
            response.force_close()  # the body was never read: it must not be taken
            # for the next request
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
        state.in_flight -= 1
        rt.in_flight -= 1
        metrics.observe(ex)
        _access(ex)


def _access(ex: Exchange) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {
        "request_id": ex.request_id,
        "method": ex.request.method,
        "path": ex.request.path,
        "status": ex.status,
        "key_id": ex.identity.id if ex.identity is not None and not ex.identity.anonymous else None,
        "model": ex.model,
        "requested_model": ex.requested_model,
        "stream": ex.stream,
        "latency_ms": round(ex.elapsed_ms(), 2),
        "ttfb_ms": round(ex.ttfb * 1000, 2) if ex.ttfb is not None else None,
        "upstream": ex.upstream,
        "attempts": ex.attempts,
    }
    if ex.session_id:
        fields["session_id"] = ex.session_id
    if ex.error:
        fields["error"] = ex.error
    for k, v in ex.log.items():
        if not k.startswith("_"):
            fields[k] = v
    if not write_access_line(fields):
        access_log.info("request", extra=fields)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    rt = state.runtime
    ups = await rt.upstreams.probe()
    store_state = "none"
    store = rt.ctx.store
    if store is not None:
        try:
            store_state = "ok" if await asyncio.wait_for(store.ping(), 2) else "down"
        except Exception:
            store_state = "down"
    ready = (
        not state.draining
        and any(s in ("ok", "degraded") for s in ups.values())
        and store_state in ("ok", "none")
    )
    body = {
        "status": "ready" if ready else ("draining" if state.draining else "unavailable"),
        "upstreams": ups,
        "store": store_state,
    }
    return web.json_response(body, status=200 if ready else 503)


def build_app(config: LoadedConfig) -> web.Application:
    """The application for a configuration; the chain is built here, once."""
    install_http_error_shape()
    app = web.Application(client_max_size=config.server.max_body_bytes + 1)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        from proxy.store import open_store

        store = await open_store(config.store) if _needs_store(config) else None
        rt = await build_runtime(config, store)
        app[STATE] = State(runtime=rt)
        await start_runtime(rt)
        trimmer = memory.start(config.server.trim_memory_seconds)
        yield
        await memory.stop(trimmer)
        await stop_runtime(app[STATE].runtime)
        if store is not None:
            await store.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics.handle)
    # `Expect: 100-continue` is answered in `entry`, once the key has been checked
    for path in sorted(_CHAT_PATHS | _MODELS_PATHS):
        # found by a lookup, not the pattern below
        app.router.add_route("*", path, entry, expect_handler=_no_continue)
    # any path, newlines too
    app.router.add_route("*", r"/{tail:[\s\S]*}", entry, expect_handler=_no_continue)
    return app


async def _no_continue(request: web.Request) -> None:
    return None


def _needs_store(config: LoadedConfig) -> bool:
    return any(e.type == "session" for e in config.chain)
