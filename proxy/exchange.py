"""Per-request state shared by the chain and the upstream handler.

Middlewares read the parsed request from here and register what they need of the
response: headers to add, a body transform, an event transform for streams, or a
callback when the response is complete. The upstream handler parses the response
only when one of them asks for it; otherwise it relays bytes untouched.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal, Protocol

from aiohttp import web

from proxy.config import Limits
from proxy.errors import ProxyError
from proxy.sse import Event


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling: a key from the auth middleware, or an anonymous client."""

    id: str
    scopes: frozenset[str] = frozenset()
    models: tuple[str, ...] = ("*",)
    limits: Limits | None = None  # the key's own limits (rate_limit reads them)
    model: str | None = None  # a model forced for this key (model_override reads it)
    # its place in the admission queue: higher priorities first, then by weight
    priority: int = 0
    weight: float = 1.0

    def may_use(self, model: str | None) -> bool:
        models = self.models
        if models == ("*",):
            return True
        name = model or ""
        return any(fnmatchcase(name, pattern) for pattern in models)


Terminal = Callable[["Exchange"], Awaitable[web.StreamResponse]]


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


class EventTransform(Protocol):
    """Changes a stream: each event in, the events to send out; more at the end."""

    def on_event(self, event: Event) -> list[Event]: ...

    def on_end(self) -> list[Event]: ...


class StreamOpener(Protocol):
    """Opens the client's event stream in the relay's place, for a middleware that may
    write to the client before the backend answers (voice: a filler while the first
    token is late)."""

    async def open(self, status: int, headers: dict[str, str]) -> web.StreamResponse:
        """The client's event stream: the one already open, or one opened now."""
        ...

    def claim_body(self) -> bool:
        """The answer is a body, not a stream: True when nothing has gone to the client
        (and now nothing will); False when the stream is open already."""
        ...


class OutputStage(Protocol):
    """What the client asked for, made of the chat answer once the chain is done with
    it: the Responses API's objects and events. It comes after everything else on the
    way back (the middlewares' transforms, the answer recorded for the session), which
    all see the chat answer."""

    def body(self, completion: dict[str, Any]) -> dict[str, Any]:
        """The client's body for a whole chat completion."""
        ...

    def events(self, events: list[Event]) -> list[Event]:
        """The client's events for these chat events."""
        ...

    def end(self) -> list[Event]:
        """The client's last events, at the stream's end."""
        ...

    def error(self, err: ProxyError) -> list[Event]:
        """The client's events for a failure in the middle of the stream."""
        ...


BodyTransform = Callable[[dict[str, Any]], dict[str, Any]]
CompletionCallback = Callable[["Exchange"], Awaitable[None] | None]


@dataclass(slots=True)
class Exchange:
    request: web.Request
    route: Route
    scope: str | None
    request_id: str
    # the path on the backend, after its base path (/chat/completions, /embeddings)
    upstream_path: str = ""
    started: float = field(default_factory=time.perf_counter)
    # the body as read (None: not read); b"" once `body` is encoded for the backend, so
    # that a long history is not held twice for a stream's whole life
    raw_body: bytes | None = None
    body: dict[str, Any] | None = None
    # a multipart form body (forwarded as it came); its `model` field is in
    # requested_model
    form: bool = False
    identity: Identity | None = None
    requested_model: str | None = None
    session_id: str | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    upstream_headers: dict[str, str] = field(default_factory=dict)
    # request header names (lower case) never forwarded to the backend, beyond the
    # fixed set the upstream handler drops (auth adds a custom key header here)
    upstream_drop_headers: set[str] = field(default_factory=set)
    event_transforms: list[EventTransform] = field(default_factory=list)
    # opens the client's stream when a middleware may have opened it already
    stream_opener: StreamOpener | None = None
    # the answer in another API's shape, last on the way back (the Responses API)
    output: OutputStage | None = None
    # a session this request continues, named by the proxy (a stored response's):
    # the session middleware takes it as the request's session
    continues_session: str | None = None
    body_transforms: list[BodyTransform] = field(default_factory=list)
    on_complete: list[CompletionCallback] = field(default_factory=list)
    # maps a name the client may send to the model sent upstream (model_override sets
    # it; /v1/models filtering uses it)
    model_resolver: Callable[[str], str] | None = None
    # the request's dialect (proxy/dialects/): ElevenLabs' `elevenlabs_extra_body`,
    # taken out of the body, and the conversation id it names
    elevenlabs_extra_body: dict[str, Any] | None = None
    conversation_id: str | None = None
    # filled in by the upstream handler
    status: int = 0
    stream: bool = False
    upstream: str | None = None
    replica: int | None = None  # the index of the upstream's replica that answered
    queue_ms: float | None = None  # time waited for admission (max_in_flight)
    attempts: int = 0
    ttfb: float | None = None
    # seconds from the request to the first content (or tool call) token sent on:
    # what a caller hears; for a body, when it came
    first_token: float | None = None
    completion: dict[str, Any] | None = None
    error: str | None = None
    # the backend's stream ended without `[DONE]` and without a finish_reason on each
    # choice: the answer the client got is cut short (sessions mark the turn)
    incomplete: bool = False
    # what the middlewares and the upstream handler report, for the access line and
    # the metrics
    failures: list[str] = field(default_factory=list)  # failed attempts: "upstream:kind"
    rate_limited: str | None = None  # the limit that refused the request
    rate_limit_store_down: bool = False  # counted without the shared store
    session_source: str | None = None  # elevenlabs | header | new | continued
    dropped_params: list[str] | None = None  # by validate's extra_params: drop
    tool_calls_rewritten: dict[str, int] | None = None  # by tool_keywords, per tool
    # fields a user's own middleware adds to the access line
    log: dict[str, Any] = field(default_factory=dict)
    # the client's address when a trusted load balancer forwarded it
    remote: str | None = None
    # tracing (proxy/tracing.py): the request's span when tracing, and the
    # traceparent the backend gets (the attempt's span; else the client's or new)
    span: Any = None
    traceparent: str | None = None

    @property
    def model(self) -> str | None:
        body = self.body
        if body is None:
            return self.requested_model if self.form else None
        value = body.get("model")
        return value if isinstance(value, str) else None

    @property
    def client_id(self) -> str:
        """The key id, or the client address for anonymous callers (the one a trusted
        load balancer forwarded, see server.trusted_proxies)."""
        if self.identity is not None:
            return self.identity.id
        return f"ip:{self.remote or self.request.remote or 'unknown'}"

    @property
    def wants_stream(self) -> bool:
        return bool(self.body is not None and self.body.get("stream") is True)

    @property
    def needs_parse(self) -> bool:
        """Whether any middleware needs the response parsed."""
        return bool(
            self.event_transforms or self.body_transforms or self.on_complete or self.output
        )

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


Handler = Callable[[Exchange], Awaitable[web.StreamResponse]]
Middleware = Callable[[Exchange, Handler], Awaitable[web.StreamResponse]]
