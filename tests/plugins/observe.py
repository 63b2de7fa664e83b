"""A middleware that needs the parsed stream but changes nothing: it forces the
transformed relay (parse, pass every event through, re-encode only what changed) and
keeps the assembled completion where a test can read it."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.chain import BuildContext
from proxy.exchange import Exchange, Handler, Middleware
from proxy.sse import Event

SEEN: list[dict[str, Any] | None] = []


class PassThrough:
    def on_event(self, event: Event) -> list[Event]:
        return [event]

    def on_end(self) -> list[Event]:
        return []


def observe(options: dict[str, Any], ctx: BuildContext) -> Middleware:
    async def middleware(ex: Exchange, call_next: Handler) -> web.StreamResponse:
        ex.event_transforms.append(PassThrough())
        ex.on_complete.append(lambda e: SEEN.append(e.completion))
        return await call_next(ex)

    return middleware
