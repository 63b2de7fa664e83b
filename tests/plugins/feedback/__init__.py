"""A user's own feature with a route and stored state (the README's example):
`POST /v1/feedback` keeps a caller's rating of an answer, `GET /v1/feedback` lists the
caller's own, in a SQLite file of the feature's own. Loaded by
`type: tests.plugins.feedback:feedback`."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from aiohttp import web

from proxy.chain import BuildContext, Feature
from proxy.errors import bad_request
from proxy.exchange import Exchange, Handler, Route


def feedback(options: dict[str, Any], ctx: BuildContext) -> Feature:
    path = str(options["path"])  # a missing option fails at start-up
    db = sqlite3.connect(path, check_same_thread=False)
    db.execute("CREATE TABLE IF NOT EXISTS feedback (owner TEXT, request_id TEXT, rating INT)")

    def write(owner: str, request_id: str, rating: int) -> None:
        with db:
            db.execute("INSERT INTO feedback VALUES (?, ?, ?)", (owner, request_id, rating))

    def read(owner: str) -> list[dict[str, Any]]:
        rows = db.execute("SELECT request_id, rating FROM feedback WHERE owner = ?", (owner,))
        return [{"request_id": r, "rating": n} for r, n in rows]

    async def answer(ex: Exchange) -> web.StreamResponse:
        # the end of the chain for this route: auth and the others have run
        if ex.request.method == "GET":
            items = await asyncio.to_thread(read, ex.client_id)
            return web.json_response({"object": "list", "data": items})
        body = ex.body or {}
        rating, request_id = body.get("rating"), body.get("request_id")
        if not isinstance(rating, int) or not isinstance(request_id, str):
            raise bad_request("Send {request_id: string, rating: integer}.", param="rating")
        await asyncio.to_thread(write, ex.client_id, request_id, rating)
        return web.json_response({"object": "feedback", "request_id": request_id}, status=201)

    async def middleware(ex: Exchange, call_next: Handler) -> web.StreamResponse:
        return await call_next(ex)  # nothing to do for other routes

    async def close() -> None:
        db.close()

    route = Route(
        "feedback", {"GET": "chat", "POST": "chat"}, paths=("/v1/feedback",), terminal=answer
    )
    return Feature(middleware, routes=(route,), shutdown=(close,))


__all__ = ["feedback"]
