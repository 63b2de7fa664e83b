"""rate_limit: requests per minute, tokens per minute and concurrent requests, per key.

Each caller is counted under its key id, or under its address when anonymous. A
key's own `limits` override the middleware's defaults field by field. Chat and
passthrough requests count against every limit; /v1/models and /v1/sessions count
against requests per minute only.

Tokens are reserved at admission (an estimate of the prompt plus max_tokens, or
`default_max_tokens`) and settled against the usage the backend reports when the
response ends. For a stream the proxy asks the backend for the usage chunk
(`stream_options.include_usage`) and hides it from a client that did not ask.

Counters live where `store.backend` says: Redis or PostgreSQL (shared by every
worker and replica) or this process (memory, sqlite).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy.chain import BuildContext, Feature, register
from proxy.config import WORKERS_ENV, Limits
from proxy.errors import ProxyError
from proxy.exchange import Exchange, Handler
from proxy.ratelimit import LOOKED_UP, Decision, Limiter, Quota, StoreError, format_reset
from proxy.ratelimit.estimate import Estimate, estimate
from proxy.ratelimit.local import MemoryLimiter
from proxy.ratelimit.meter import Meter, attach
from proxy.ratelimit.options import RateLimitOptions, effective_quota
from proxy.routes import Route

if TYPE_CHECKING:
    from proxy.ratelimit.postgres import PostgresLimiter

log = logging.getLogger("chat_proxy.rate_limit")

_NAMES = {
    "requests": "requests per minute",
    "tokens": "tokens per minute",
    "concurrent": "concurrent requests",
}


class _Throttled:
    """A warning logged at most once per `every` seconds, with a count of the rest."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._next = 0.0
        self._suppressed = 0

    def warning(self, message: str, **fields: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            fields["suppressed"] = self._suppressed
        self._suppressed = 0
        self._next = now + self.every
        log.warning(message, extra=fields)


# ---------------------------------------------------------------------------
# responses


def _headers(decision: Decision, headers: dict[str, str] | None = None) -> dict[str, str]:
    """The x-ratelimit-* headers of a decision, added to `headers` if given."""
    if headers is None:
        headers = {}
    window = decision.requests
    if window is not None:
        headers["x-ratelimit-limit-requests"] = str(window.limit)
        headers["x-ratelimit-remaining-requests"] = str(window.remaining)
        headers["x-ratelimit-reset-requests"] = format_reset(window.reset)
    window = decision.tokens
    if window is not None:
        headers["x-ratelimit-limit-tokens"] = str(window.limit)
        headers["x-ratelimit-remaining-tokens"] = str(window.remaining)
        headers["x-ratelimit-reset-tokens"] = format_reset(window.reset)
    return headers


def _retry_headers(seconds: float) -> dict[str, str]:
    ms = max(1, math.ceil(seconds * 1000))
    return {"Retry-After": str(max(1, math.ceil(ms / 1000))), "retry-after-ms": str(ms)}


def _who(ex: Exchange, key: str) -> str:
    return f"key '{key}'" if not key.startswith("ip:") else f"client {key[3:]}"


def _refusal(ex: Exchange, key: str, quota: Quota, cost: int, decision: Decision) -> ProxyError:
    parts: list[str] = []
    for kind in decision.exceeded:
        if kind == "requests":
            parts.append(f"{_NAMES[kind]} (limit {quota.requests_per_minute})")
        elif kind == "tokens":
            left = decision.tokens.remaining if decision.tokens else 0
            parts.append(
                f"{_NAMES[kind]} (limit {quota.tokens_per_minute}, remaining {left}, "
                f"this request needs about {cost})"
            )
        else:
            parts.append(f"{_NAMES[kind]} (limit {quota.max_concurrent} in flight)")
    message = f"Rate limit reached for {' and '.join(parts)} on {_who(ex, key)}."
    if decision.exceeded == ("concurrent",):
        message += " Try again when one of your requests has finished."
    else:
        message += f" Try again in {format_reset(decision.retry_after)}."
    headers = _headers(decision)
    headers.update(_retry_headers(decision.retry_after))
    return ProxyError(429, message, code="rate_limit_exceeded", headers=headers)


def _too_large(ex: Exchange, key: str, tpm: int, est: Estimate) -> ProxyError:
    detail = f"prompt about {est.prompt}"
    if est.explicit:
        detail += f" plus up to {est.completion} completion tokens"
    return ProxyError(
        429,
        f"Request too large for tokens per minute: it needs about {est.total} tokens "
        f"({detail}) and the limit on {_who(ex, key)} is {tpm} per minute. Reduce the "
        "prompt or max_tokens; retrying will not help.",
        code="rate_limit_exceeded",
    )


# ---------------------------------------------------------------------------
# the middleware


def _workers() -> int:
    try:
        return max(1, int(os.environ.get(WORKERS_ENV, "1") or 1))
    except ValueError:
        return 1


@dataclass
class _Holder:
    limiter: Limiter | None = None
    warn_check: _Throttled = field(default_factory=_Throttled)
    warn_settle: _Throttled = field(default_factory=_Throttled)


@dataclass
class HandedOn:
    """The in-process counters, handed to the rate_limit of the chain that replaces
    this one on a reload (which then owns them: this chain does not close them)."""

    limiter: MemoryLimiter | None = None
    taken: bool = False


@register(
    "rate_limit",
    RateLimitOptions,
    after=(("auth", "callers are counted by their address, not by their key"),),
)
def rate_limit(options: RateLimitOptions, ctx: BuildContext) -> Feature:
    store = ctx.config.store
    holder = _Holder()

    async def startup() -> None:
        if store.backend == "postgres":
            pg = await _postgres_limiter(ctx)
            holder.limiter = pg
            if not await pg.ping():
                log.warning(
                    "rate-limit store unreachable at start-up; on_store_error: %s applies until it answers",
                    options.on_store_error,
                )
            return
        if store.backend == "redis":
            from proxy.ratelimit.redis import open_limiter

            # on the application's shared connections where it opened them
            limiter = open_limiter(store, ctx.redis)
            holder.limiter = limiter
            if not await limiter.ping():
                log.warning(
                    "rate-limit store unreachable at start-up; on_store_error: %s applies until it answers",
                    options.on_store_error,
                )
            return
        # a reload keeps the counters: the chain it replaces hands its limiter on
        inherited = ctx.inherit(HandedOn)
        if inherited is not None and inherited.limiter is not None and not inherited.taken:
            inherited.taken = True
            holder.limiter = handoff.limiter = inherited.limiter
            return
        holder.limiter = handoff.limiter = MemoryLimiter()
        workers = _workers()
        if workers > 1:
            log.warning(
                "rate limits are per worker: with %d workers a key may get %d times its limit; "
                "use store.backend: redis",
                workers,
                workers,
            )
        else:
            log.info(
                "rate limits are counted in this process (store.backend: %s): each replica "
                "counts on its own; use store.backend: redis to share them",
                store.backend,
            )

    async def shutdown() -> None:
        if holder.limiter is not None:
            if not handoff.taken:  # else the next chain counts on
                await holder.limiter.close()
            holder.limiter = None

    handoff = HandedOn()

    async def store_failed(ex: Exchange, call_next: Handler, exc: StoreError) -> web.StreamResponse:
        holder.warn_check.warning(
            f"rate-limit store unreachable; requests are "
            f"{'let through unlimited' if options.on_store_error == 'allow' else 'refused with 503'} "
            f"(on_store_error: {options.on_store_error})",
            error=str(exc),
        )
        ex.rate_limit_store_down = True
        if options.on_store_error == "deny":
            raise ProxyError(
                503,
                "The proxy cannot check rate limits because its store is unreachable, so it "
                "refuses requests until the store is back (on_store_error: deny).",
                code="rate_limit_store_unavailable",
                headers={"Retry-After": "1"},
            )
        return await call_next(ex)

    # (id of the key's own limits, route) -> (those limits, the quota): keys and their
    # limits live as long as the configuration, so this stays small
    quotas: dict[tuple[int, Route], tuple[Limits | None, Quota]] = {}

    def quota_for(own: Limits | None, route: Route) -> Quota:
        hit = quotas.get((id(own), route))
        if hit is not None and hit[0] is own:
            return hit[1]
        quota = effective_quota(options, own, route)
        if len(quotas) >= 4096:
            quotas.clear()
        quotas[(id(own), route)] = (own, quota)
        return quota

    async def middleware(ex: Exchange, call_next: Handler) -> web.StreamResponse:
        identity = ex.identity
        quota = quota_for(identity.limits if identity is not None else None, ex.route)
        limiter = holder.limiter
        if not quota or limiter is None:
            return await call_next(ex)
        key = ex.client_id
        est: Estimate | None = None
        cost = 0
        tpm = quota.tokens_per_minute
        if tpm:
            est = estimate(ex, options.default_max_tokens)
            cost = est.total
            if cost == 0:
                est, tpm = None, None  # nothing to count (a body that is not JSON)
                quota = Quota(quota.requests_per_minute, None, quota.max_concurrent)
            elif cost > tpm:
                if est.explicit or est.prompt > tpm:
                    ex.rate_limited = "tokens"
                    raise _too_large(ex, key, tpm, est)
                cost = tpm  # only the default completion budget does not fit: trim it
        # the in-process limiter never waits: called directly, without a coroutine
        local = limiter if type(limiter) is MemoryLimiter else None
        try:
            if local is not None:
                decision = local.acquire_now(key, quota, cost)
            elif (lookup := _lookahead(ctx, limiter, ex)) is not None:
                # the session lookup this request will make, in the check's round trip
                owner, digest, call = lookup
                decision = await limiter.acquire(key, quota, cost, call)  # type: ignore[call-arg]
                if not isinstance(decision.looked_up, Exception):
                    found = decision.looked_up
                    ex.request[LOOKED_UP] = (owner, digest, str(found) if found else None)
            else:
                decision = await limiter.acquire(key, quota, cost)
        except StoreError as exc:
            return await store_failed(ex, call_next, exc)
        if not decision.allowed:
            ex.rate_limited = decision.exceeded[0]  # the metric's label
            raise _refusal(ex, key, quota, cost, decision)
        _headers(decision, ex.response_headers)
        meter: Meter | None = None
        if est is not None and ex.body is not None:
            meter = attach(ex, ex.body, options.stream_usage)
        try:
            return await call_next(ex)
        finally:
            delta = 0
            if meter is not None and est is not None:
                delta = meter.actual(ex, est) - cost
            if local is not None:
                # synchronous, so a cancelled request cannot interrupt it
                local.settle_now(key, quota, decision.lease, delta)
            elif decision.lease is not None or delta:
                await asyncio.shield(_settle(limiter, holder, key, quota, decision.lease, delta))

    return Feature(middleware, startup=(startup,), shutdown=(shutdown,), handoff=handoff)


def _lookahead(ctx: BuildContext, limiter: Limiter, ex: Exchange) -> tuple[str, str, Any] | None:
    """The session lookup `ex` will make, when the limiter and the session store are
    on one Redis: (owner, digest, the store's script call)."""
    store = ctx.store
    ahead = getattr(store, "lookahead", None)
    if ahead is None or getattr(limiter, "scope", None) != "shared" or store is None:
        return None
    from proxy.ratelimit.redis import RedisLimiter

    if not isinstance(limiter, RedisLimiter):
        return None
    wanted = ahead(ex)
    if wanted is None:
        return None
    owner, digest = wanted
    return owner, digest, store.find_call(owner, digest)  # type: ignore[attr-defined]


async def _postgres_limiter(ctx: BuildContext) -> PostgresLimiter:
    """The PostgreSQL limiter, on the database the session store opened (one pool per
    process), or on one of its own without such a store."""
    from proxy.pgstore import open_database
    from proxy.ratelimit.postgres import PostgresLimiter
    from proxy.sessions.store.postgres import PostgresStore

    if isinstance(ctx.store, PostgresStore):
        return PostgresLimiter(ctx.store.db)
    return PostgresLimiter(await open_database(ctx.config.store.dsn), owns_db=True)


async def _settle(
    limiter: Limiter, holder: _Holder, key: str, quota: Quota, lease: str | None, delta: int
) -> None:
    try:
        await limiter.settle(key, quota, lease, delta)
    except StoreError as exc:
        holder.warn_settle.warning(
            "rate-limit store unreachable; a finished request was not settled", error=str(exc)
        )


__all__ = ["HandedOn", "RateLimitOptions", "rate_limit"]
