"""Routes: what a request path is, which scope it needs, and what answers it.

The chat, models and passthrough routes are answered by the upstream handler; a
feature may contribute routes of its own (the Sessions API), answered by its own
terminal handler at the end of the same chain, so that auth and every other
middleware run for them too.
"""

from __future__ import annotations

from aiohttp import web

from proxy.errors import not_found
from proxy.exchange import Exchange, Route

__all__ = ["CHAT", "MODELS", "PASSTHROUGH", "SESSIONS_OFF", "UNKNOWN", "Route", "Routes"]

CHAT = Route("chat", {"POST": "chat"}, "all", paths=("/v1/chat/completions", "/chat/completions"))
MODELS = Route("models", {"GET": "models"}, paths=("/v1/models", "/models"))
PASSTHROUGH = Route("passthrough", {"*": "chat"}, "all", prefixes=("/v1/",))
# a request refused before its route is known (a path that climbs out, a 404)
UNKNOWN = Route("unknown", {}, "none")


async def _sessions_off(ex: Exchange) -> web.StreamResponse:
    raise not_found("Sessions are not enabled on this proxy.")


# the Sessions API's paths where no session middleware runs: never passed through to
# a backend, and answered 404 once the key and its scope are checked
SESSIONS_OFF = Route(
    "sessions",
    {"GET": "sessions:read", "DELETE": "sessions:write", "*": "sessions:read"},
    paths=("/v1/sessions",),
    prefixes=("/v1/sessions/",),
    terminal=_sessions_off,
)


class Routes:
    """The routes of one chain: the chat and models routes first, then those features
    contributed, then the passthrough of every other /v1/ path."""

    def __init__(self, contributed: tuple[Route, ...] = ()) -> None:
        self._exact: dict[str, Route] = {}
        for route in (CHAT, MODELS):
            for p in route.paths:
                self._exact[p] = route
        self._others = (*contributed, SESSIONS_OFF)

    def classify(self, method: str, path: str) -> tuple[Route, str | None, str]:
        """(route, scope, upstream path) for a normalised path, or raise 404/405."""
        route = self._exact.get(path)
        if route is not None:
            scope = route.scope(method, path)
            upstream_path = "/chat/completions" if route is CHAT else "/models"
            return route, scope, upstream_path
        for route in self._others:
            if route.matches(path):
                return route, route.scope(method, path), path
        if path.startswith("/v1/"):
            return PASSTHROUGH, "chat", path[3:]
        raise not_found(f"Unknown path {path}.")
