"""The sessions page's route: the page's files and the JSON its script reads.

    GET /ui, /ui/app.js, /ui/app.css      the page (proxy/ui/static/)
    GET /ui/api/sessions?limit&after       the caller's sessions, newest first (the
                                           shape of GET /v1/sessions)
    GET /ui/api/sessions/{id}?from=N       one session, its turns from the N-th on
    GET /ui/api/upstreams                  each upstream's replicas and their state

Every path needs the `admin` scope (checked by the auth middleware, which contributes
this route) and is counted by no rate limit. The page is live by polling: its script
asks for the first page of sessions every two seconds and, for a session it shows
open, only the turns it has not seen. The store is the one every worker and every
proxy replica writes to (SQLite, Redis, Postgres), so turns answered by any of them
appear; the replicas' states are those of the worker that answers the poll.

Nothing here names a key or a replica's address: sessions carry their key's id, and
replicas their index.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from proxy import paths
from proxy.errors import ProxyError, bad_request, not_found
from proxy.exchange import Exchange, Route
from proxy.sessions.api import session_object
from proxy.sessions.ids import SAFE_ID
from proxy.sessions.store import Session, UnknownCursor

if TYPE_CHECKING:
    from proxy.routing import Upstream
    from proxy.runtime import Runtime
    from proxy.sessions.store import SessionStore

log = logging.getLogger("chat_proxy.ui")
T = TypeVar("T")

PREFIX = "/ui"
API = PREFIX + "/api"
DEFAULT_LIMIT = 50
MAX_LIMIT = 100

# the page's files: path -> (file in proxy/ui/static, content type)
FILES: Mapping[str, tuple[str, str]] = {
    PREFIX: ("index.html", "text/html; charset=utf-8"),
    PREFIX + "/": ("index.html", "text/html; charset=utf-8"),
    PREFIX + "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    PREFIX + "/app.css": ("app.css", "text/css; charset=utf-8"),
}

# on every answer of the page: its own files and nothing else (no inline script, no
# other origin), never framed, never cached, never sniffed into another type
HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@cache
def static_file(name: str) -> bytes:
    """A file of the page, read from the installed package once."""
    return resources.files("proxy.ui").joinpath("static", name).read_bytes()


def _headers(ex: Exchange) -> dict[str, str]:
    return {**ex.response_headers, **HEADERS}


def _json(ex: Exchange, doc: Any) -> web.Response:
    return web.json_response(doc, headers=_headers(ex))


def _int_param(ex: Exchange, name: str, default: int, low: int, high: int) -> int:
    raw = ex.request.query.get(name)
    if raw is None:
        return default
    value = raw.strip()
    if not value.isdigit() or not low <= int(value) <= high:
        raise bad_request(
            f"`{name}` must be an integer from {low} to {high}; you sent {raw!r}.", param=name
        )
    return int(value)


async def _ask(call: Awaitable[T]) -> T:
    """A store call; a store that fails answers 503, as the Sessions API does."""
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


def _runtime(ex: Exchange) -> Runtime:
    from proxy.runtime import STATE

    return ex.request.app[STATE].runtime


def _store(ex: Exchange) -> SessionStore | None:
    """The store the session middleware records to; None without one."""
    rt = _runtime(ex)
    if not any(e.type == "session" for e in rt.config.chain):
        return None
    return rt.ctx.store


def _session(s: Session, *, turns: bool = False) -> dict[str, Any]:
    """A session as the Sessions API has it, and `updated_at`: the time of its last
    turn to the store's precision, which orders the page's list as the store does."""
    doc = session_object(s, turns=turns)
    doc["updated_at"] = s.updated
    return doc


async def list_sessions(ex: Exchange) -> web.StreamResponse:
    limit = _int_param(ex, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    after = ex.request.query.get("after") or None
    store = _store(ex)
    doc: dict[str, Any] = {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
        "key_id": ex.client_id,
        "recording": store is not None,
    }
    if store is None:
        return _json(ex, doc)
    try:
        page = await _ask(store.list_sessions(ex.client_id, limit, after))
    except UnknownCursor:
        raise bad_request(f"`after` names no session of yours: {after!r}.", param="after") from None
    data = [_session(s) for s in page.data]
    doc.update(
        data=data,
        first_id=data[0]["id"] if data else None,
        last_id=data[-1]["id"] if data else None,
        has_more=page.has_more,
    )
    return _json(ex, doc)


async def get_session(ex: Exchange, session_id: str) -> web.StreamResponse:
    start = _int_param(ex, "from", 0, 0, 10**9)
    store = _store(ex)
    if store is None:
        raise not_found("Sessions are not recorded on this proxy (no session middleware).")
    session = None
    if SAFE_ID.match(session_id):
        session = await _ask(store.get_session(ex.client_id, session_id))
    if session is None:
        # another key's session answers exactly like one that does not exist
        raise not_found(f"No session found with id '{session_id}'.")
    doc = _session(session, turns=True)
    doc["turns"] = doc["turns"][start:]
    doc["turns_from"] = start
    return _json(ex, doc)


def _engine(up: Upstream, index: int) -> dict[str, Any] | None:
    engine = up.replicas[index].engine
    if engine is None:
        return None
    return {"running": engine.running, "waiting": engine.waiting, "kv_usage": engine.kv_usage}


async def upstreams_view(rt: Runtime) -> dict[str, Any]:
    """Each upstream, a fleet's replicas by index (an upstream with `url` as one), and
    their state as /readyz reports it: ok, degraded, open, unreachable or stopped."""
    ups = rt.upstreams
    out: list[dict[str, Any]] = []
    for up in ups.all:
        states = await asyncio.gather(*(r.probe() for r in up.replicas))
        replicas: list[dict[str, Any]] = []
        for r, state in zip(up.replicas, states, strict=True):
            row: dict[str, Any] = {"index": r.index, "state": state, "in_flight": r.in_flight}
            engine = _engine(up, r.index)
            if engine is not None:
                row["engine"] = engine
            replicas.append(row)
        out.append(
            {
                "name": up.name,
                "fleet": up.fleet,
                "balance": up.balance if up.fleet else None,
                "max_in_flight": up.max_in_flight,
                "state": await up.probe(),
                "replicas": replicas,
            }
        )
    return {"object": "list", "data": out, "queue": {"waiting": ups.admission.waiting}}


async def upstreams(ex: Exchange) -> web.StreamResponse:
    return _json(ex, await upstreams_view(_runtime(ex)))


async def handle(ex: Exchange) -> web.StreamResponse:
    path = paths.normalise(ex.request.path)
    served = FILES.get(path)
    if served is not None:
        name, content_type = served
        headers = _headers(ex)
        headers["Content-Type"] = content_type
        return web.Response(body=static_file(name), headers=headers)
    if path in (API + "/sessions", API + "/sessions/"):
        return await list_sessions(ex)
    if path.startswith(API + "/sessions/"):
        session_id = path[len(API + "/sessions/") :]
        if "/" not in session_id:
            return await get_session(ex, session_id)
    elif path == API + "/upstreams":
        return await upstreams(ex)
    raise not_found(f"Unknown path {path}.")


# GET only; the page is read-only, so nothing a browser sends on its own (its cached
# Basic credentials ride along on any request to this origin) can change a thing
UI_ROUTE = Route(
    "ui",
    {"GET": "admin"},
    "none",
    paths=(PREFIX,),
    prefixes=(PREFIX + "/",),
    terminal=handle,
)
