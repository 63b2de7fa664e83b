"""A user's own middleware, loaded by `type: tests.plugins.audit:audit` (the README's
example)."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from proxy.chain import BuildContext
from proxy.exchange import Exchange, Handler, Middleware


def audit(options: dict[str, Any], ctx: BuildContext) -> Middleware:
    header = str(options.get("header", "X-Audited-By"))
    team = str(options["team"])  # a missing option fails at start-up, not per request
    say = options.get("say")

    async def middleware(ex: Exchange, call_next: Handler) -> web.StreamResponse:
        ex.response_headers[header] = team
        ex.upstream_headers["X-Team"] = team
        ex.log["team"] = team
        if say:
            logging.getLogger("tests.audit").warning(str(say))
        return await call_next(ex)

    return middleware
