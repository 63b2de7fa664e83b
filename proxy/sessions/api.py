"""The Sessions API: GET /v1/sessions, GET and DELETE /v1/sessions/{id}.

A caller sees only its own sessions (those recorded under its key, or its address
without auth): another caller's session id answers 404 exactly like an unknown one.
Scopes (sessions:read, sessions:write) are checked by the auth middleware.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from proxy.errors import ProxyError, bad_request, not_found
from proxy.exchange import Exchange, Route
from proxy.sessions.store import Session, SessionStore, UnknownCursor

log = logging.getLogger("chat_proxy.session")
T = TypeVar("T")

PREFIX = "/v1/sessions"
DEFAULT_LIMIT = 20
MAX_LIMIT = 100

SessionsApi = Callable[[Exchange], Awaitable[web.StreamResponse]]
Flush = Callable[[], Awaitable[None]]  # waits until the turns queued so far are written


def session_object(s: Session, *, turns: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": s.id,
        "object": "session",
        "created": int(s.created),
        "updated": int(s.updated),
        "source": s.source,
        "key_id": s.key_id,
        "model": s.model,
        "turn_count": s.turn_count,
        "usage": {
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "total_tokens": s.total_tokens,
        },
    }
    if turns:
        doc["turns"] = s.turns or []
    return doc


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    value = raw.strip()
    if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise bad_request(
            f"`limit` must be an integer from 1 to {MAX_LIMIT}; you sent {raw!r}.", param="limit"
        )
    return int(value)


def _unknown(session_id: str) -> ProxyError:
    return not_found(f"No session found with id '{session_id}'.")


def _method_not_allowed(method: str, path: str, allowed: str) -> ProxyError:
    return ProxyError(
        405,
        f"Method {method} is not allowed on {path}; use {allowed}.",
        code="method_not_allowed",
        headers={"Allow": allowed.replace(" or ", ", ")},
    )


async def _ask(call: Awaitable[T]) -> T:
    """A store call; a store that fails (Redis gone, a disk error) answers 503."""
    try:
        return await call
    except UnknownCursor:
        raise
    except Exception as exc:
        log.error("the session store failed: %s", exc or type(exc).__name__)
        raise ProxyError(
            503,
            "The session store is unavailable; try again shortly.",
            code="store_unavailable",
            headers={"Retry-After": "1"},
        ) from None


def sessions_route(store: SessionStore, flush: Flush) -> Route:
    """The Sessions API's route: its paths, the scope each method needs, its handler."""
    return Route(
        "sessions",
        {"GET": "sessions:read", "DELETE": "sessions:write", "*": "sessions:read"},
        paths=(PREFIX,),
        prefixes=(PREFIX + "/",),
        terminal=sessions_api(store, flush),
    )


def sessions_api(store: SessionStore, flush: Flush) -> SessionsApi:
    """The handler the app routes /v1/sessions* to. `flush` is called before each
    read and delete, so that they see every turn answered before them."""

    async def list_sessions(ex: Exchange) -> web.StreamResponse:
        query = ex.request.query
        limit = _limit(query.get("limit"))
        after = query.get("after") or None
        await flush()
        try:
            page = await _ask(store.list_sessions(ex.client_id, limit, after))
        except UnknownCursor:
            raise bad_request(
                f"`after` names no session of yours: {after!r}.", param="after"
            ) from None
        data = [session_object(s) for s in page.data]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": page.has_more,
            },
            headers=ex.response_headers,
        )

    async def get_session(ex: Exchange, session_id: str) -> web.StreamResponse:
        await flush()
        session = await _ask(store.get_session(ex.client_id, session_id))
        if session is None:
            raise _unknown(session_id)
        return web.json_response(session_object(session, turns=True), headers=ex.response_headers)

    async def delete_session(ex: Exchange, session_id: str) -> web.StreamResponse:
        await flush()
        if not await _ask(store.delete_session(ex.client_id, session_id)):
            raise _unknown(session_id)
        return web.json_response(
            {"id": session_id, "object": "session.deleted", "deleted": True},
            headers=ex.response_headers,
        )

    async def handle(ex: Exchange) -> web.StreamResponse:
        request = ex.request
        method, path = request.method, request.path
        rest = path[len(PREFIX) :]
        if rest in ("", "/"):
            if method != "GET":
                raise _method_not_allowed(method, path, "GET")
            return await list_sessions(ex)
        session_id = rest[1:]
        if "/" in session_id or not rest.startswith("/"):
            raise not_found(f"Unknown path {path}.")
        if method == "GET":
            return await get_session(ex, session_id)
        if method == "DELETE":
            return await delete_session(ex, session_id)
        raise _method_not_allowed(method, path, "GET or DELETE")

    return handle
