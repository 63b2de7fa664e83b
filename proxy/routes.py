"""Routes: what a request path is, which scope it needs, and what answers it.

The chat, models and passthrough routes are answered by the upstream handler; a
feature may contribute routes of its own (the Sessions API), answered by its own
terminal handler at the end of the same chain, so that auth and every other
middleware run for them too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from proxy.errors import ProxyError, not_found

if TYPE_CHECKING:
    from aiohttp import web

    from proxy.exchange import Exchange

Terminal = Callable[["Exchange"], Awaitable["web.StreamResponse"]]


@dataclass(frozen=True, eq=False, slots=True)
class Route:
    """One route. `scopes` maps a method to the scope it needs; a method not in it is
    a 405 (`*` stands for any other method). `terminal` answers it at the end of the
    chain; None: the upstream handler, sent to the backend's `upstream path`."""

    name: str  # in the metrics and the access line
    scopes: Mapping[str, str | None]
    # what rate_limit counts: every limit, requests per minute only, or nothing
    metered: Literal["all", "requests", "none"] = "requests"
    paths: tuple[str, ...] = ()  # exact paths
    prefixes: tuple[str, ...] = ()  # paths that start with one of these
    terminal: Terminal | None = field(default=None, repr=False)

    def scope(self, method: str, path: str) -> str | None:
        scopes = self.scopes
        if method in scopes:
            return scopes[method]
        if "*" in scopes:
            return scopes["*"]
        allowed = ", ".join(m for m in scopes if m != "*")
        raise ProxyError(
            405,
            f"Method {method} is not allowed on {path}; use {allowed}.",
            code="method_not_allowed",
        )

    def matches(self, path: str) -> bool:
        return path in self.paths or path.startswith(self.prefixes)


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
