"""The options of the rate_limit middleware, and the quota they give a request."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from proxy.config import Limits
from proxy.ratelimit import Quota
from proxy.routes import Route


class RateLimitOptions(Limits):
    """The defaults for keys without their own limits, and how to count."""

    on_store_error: Literal["allow", "deny"] = "allow"
    # completion tokens reserved for a request that sets no max_tokens
    default_max_tokens: int = Field(512, gt=0)
    # ask the backend for the usage chunk of a stream, to settle tokens exactly
    stream_usage: bool = True


def effective_quota(defaults: Limits, own: Limits | None, route: Route) -> Quota:
    """The key's own limits where it has them, the defaults elsewhere; by route."""

    def pick(name: str) -> int | None:
        mine = getattr(own, name) if own is not None else None
        value: int | None = mine if mine is not None else getattr(defaults, name)
        return value

    rpm = pick("requests_per_minute")
    if route.metered == "requests":
        return Quota(requests_per_minute=rpm)
    if route.metered == "none":
        return Quota()
    return Quota(rpm, pick("tokens_per_minute"), pick("max_concurrent"))


__all__ = ["RateLimitOptions", "effective_quota"]
