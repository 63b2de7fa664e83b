"""A middleware with a bug, to show a fault becomes a clean 500."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.chain import BuildContext
from proxy.exchange import Exchange, Handler, Middleware


def broken(options: dict[str, Any], ctx: BuildContext) -> Middleware:
    async def middleware(ex: Exchange, call_next: Handler) -> web.StreamResponse:
        if "X-OK" not in ex.request.headers:
            _ = 1 / 0
        return await call_next(ex)

    return middleware
