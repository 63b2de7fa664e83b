"""build_app(config) -> web.Application: the routes, the chain, and the lifecycle.

A Runtime is everything one configuration serves with (the chain, its routes and
checks, the upstreams); a reload swaps it whole, and the one it replaces is retired
once its requests are done."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING

from aiohttp import web

from proxy import entry, metrics, tracing, trim, upstream
from proxy.chain import BuildContext, Check, build_chain, compose
from proxy.config import LoadedConfig
from proxy.errors import install_http_error_shape
from proxy.exchange import Exchange, Handler
from proxy.responses.api import stored_route
from proxy.routes import CHAT, MODELS, Routes
from proxy.runtime import STATE, Runtime, State
from proxy.sessions.store.base import SessionStore

if TYPE_CHECKING:
    # redis-py and what it imports take about 20 MB a process: imported by the
    # Redis store and limiter only
    from proxy.shared_redis import SharedRedis

log = logging.getLogger("chat_proxy")

__all__ = [
    "STATE",
    "Runtime",
    "State",
    "build_app",
    "build_runtime",
    "start_runtime",
    "stop_runtime",
]


def _terminal(upstreams: upstream.Upstreams, before_upstream: tuple[Check, ...]) -> Handler:
    """The end of the chain: a feature's own route answers itself; the others go to
    the upstream handler, once the checks that must see the final request pass."""

    def terminal(ex: Exchange) -> Awaitable[web.StreamResponse]:
        # a plain function handing on the handler's awaitable: no coroutine of its own
        # for each request, nor alive for a stream's life
        route = ex.route
        if route.terminal is not None:
            return route.terminal(ex)
        if route is MODELS:
            return upstream.list_models(ex, upstreams)
        for check in before_upstream:
            check(ex)
        return upstream.handle(ex, upstreams, ex.upstream_path)

    return terminal


async def build_runtime(
    config: LoadedConfig,
    store: SessionStore | None = None,
    previous: Runtime | None = None,
    redis: SharedRedis | None = None,
) -> Runtime:
    """Build the chain and the upstreams for a configuration (not yet started);
    `previous` is the runtime it replaces on a reload."""
    ctx = BuildContext(
        config=config,
        store=store,
        redis=redis,
        previous=previous.chain.handoffs if previous else (),
    )
    chain = build_chain(ctx)
    ups = upstream.Upstreams(config.upstreams, config.queue)
    ups.keepalive = config.server.keepalive_seconds
    ups.max_response_bytes = config.server.max_response_bytes
    handler = compose(chain.middlewares, _terminal(ups, chain.before_upstream))
    return Runtime(
        config=config,
        upstreams=ups,
        chain=chain,
        handler=handler,
        routes=Routes((*chain.routes, stored_route(store, ups))),
        ctx=ctx,
        before_body=chain.before_body,
        trusted=tuple(ipaddress.ip_network(n, strict=False) for n in config.server.trusted_proxies),
    )


async def start_runtime(rt: Runtime) -> None:
    await rt.upstreams.start()
    for hook in rt.chain.startup:
        await hook()


async def stop_runtime(rt: Runtime) -> None:
    # the reverse of the start, as responses pass the chain bottom to top
    for hook in reversed(rt.chain.shutdown):
        try:
            await hook()
        except Exception:
            log.exception("shutdown hook failed")
    await rt.upstreams.close()


async def proxied(request: web.Request) -> web.StreamResponse:
    return await entry.handle(request, request.app[STATE])


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, headers={"Server-Timing": "proxy;dur=0"})


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
    body: dict[str, object] = {
        "status": "ready" if ready else ("draining" if state.draining else "unavailable"),
        "upstreams": ups,
        "store": store_state,
    }
    replicas = await rt.upstreams.replica_states()
    if replicas:
        body["replicas"] = replicas
        body["queue"] = {"waiting": rt.upstreams.admission.waiting}
    return web.json_response(
        body, status=200 if ready else 503, headers={"Server-Timing": "proxy;dur=0"}
    )


def build_app(config: LoadedConfig) -> web.Application:
    """The application for a configuration; the chain is built here, once."""
    install_http_error_shape()
    app = web.Application(client_max_size=config.server.max_body_bytes + 1)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        from proxy.sessions.store import open_store

        # one Redis pool for the session store and the counters, opened once here
        pool: SharedRedis | None = None
        if _needs_redis(config):
            from proxy.shared_redis import open_pool

            pool = open_pool(config.store)
        store = await open_store(config.store, pool) if _needs_store(config) else None
        tracing.configure(config.observability)
        rt = await build_runtime(config, store, redis=pool)
        app[STATE] = State(runtime=rt)
        await start_runtime(rt)
        trimmer = trim.start(config.server.trim_memory_seconds)
        # without the session middleware (whose retention purge covers them), stored
        # responses are purged after 30 days here
        purger = (
            asyncio.create_task(_purge_responses(store))
            if store is not None and not any(e.type == "session" for e in config.chain)
            else None
        )
        yield
        if purger is not None:
            purger.cancel()
        await trim.stop(trimmer)
        await stop_runtime(app[STATE].runtime)
        if store is not None:
            await store.close()
        if pool is not None:
            from proxy.shared_redis import close_pool

            await close_pool(pool)
        # the spans still queued, flushed off the loop (bounded by the export timeout)
        await asyncio.get_running_loop().run_in_executor(None, tracing.shutdown)

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics.handle)
    # `Expect: 100-continue` is answered in proxy/entry.py, once the key is checked
    for path in sorted((*CHAT.paths, *MODELS.paths)):
        # found by a lookup, not the pattern below
        app.router.add_route("*", path, proxied, expect_handler=_no_continue)
    # any path, newlines too; the chain's routes (proxy/routes.py) tell them apart
    app.router.add_route("*", r"/{tail:[\s\S]*}", proxied, expect_handler=_no_continue)
    return app


async def _no_continue(request: web.Request) -> None:
    return None


RESPONSES_RETENTION = 30 * 86400.0


async def _purge_responses(store: SessionStore) -> None:
    while True:
        try:
            await store.purge(time.time() - RESPONSES_RETENTION)
        except Exception as exc:
            log.warning("stored responses purge failed: %s", exc)
        await asyncio.sleep(3600)


def _needs_store(config: LoadedConfig) -> bool:
    # sessions, and the Responses API's stored responses, which every proxy serves
    return True


def _needs_redis(config: LoadedConfig) -> bool:
    return config.store.backend == "redis"
