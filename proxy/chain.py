"""The middleware registry and the chain builder.

A middleware is a plain `async (exchange, call_next) -> StreamResponse`. A built-in
type registers a factory and the pydantic model of its options; a user's own is named
`module.path:factory` and receives its options as a dict. The whole chain is
validated and built once, at start-up or reload, never per request.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from aiohttp import web
from pydantic import BaseModel, ValidationError

from proxy.config import LoadedConfig, MiddlewareEntry, validation_errors
from proxy.exchange import Exchange, Handler, Middleware
from proxy.routes import Route

if TYPE_CHECKING:
    from proxy.sessions.store.base import SessionStore
    from proxy.shared_redis import SharedRedis


Hook = Callable[[], Awaitable[None]]
# a check of the request that raises ProxyError to refuse it
Check = Callable[[Exchange], object]
T = TypeVar("T")


@dataclass(frozen=True)
class Feature:
    """What a middleware type contributes to the application: its middleware, its
    routes (answered by their own terminal at the end of the chain), hooks run when
    the application starts and stops, checks at two points of a request, and state
    to hand to the same feature in the chain that replaces this one on a reload."""

    middleware: Middleware
    routes: tuple[Route, ...] = ()
    startup: tuple[Hook, ...] = ()
    shutdown: tuple[Hook, ...] = ()
    # before a client that sent `Expect: 100-continue` is asked for its body
    before_body: tuple[Check, ...] = ()
    # just before the request leaves for the backend, once every middleware that
    # may change it has run (auth's model allowlist)
    before_upstream: tuple[Check, ...] = ()
    handoff: object | None = None


@dataclass
class BuildContext:
    """What a middleware factory may use: the whole config, the store the
    application opened, and what the chain this one replaces handed on."""

    config: LoadedConfig
    store: SessionStore | None = None
    # the Redis pool the application opened for a Redis store (proxy/shared_redis.py)
    redis: SharedRedis | None = None
    # the hand-offs of the chain this one replaces (a reload), by their type
    previous: tuple[object, ...] = ()

    def inherit(self, kind: type[T]) -> T | None:
        """The replaced chain's hand-off of this type, if it had one."""
        for item in self.previous:
            if isinstance(item, kind):
                return item
        return None


@dataclass(frozen=True)
class Chain:
    """A built chain: each entry's name and feature, top of the list first."""

    entries: tuple[tuple[str, Feature], ...]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.entries]

    @property
    def middlewares(self) -> list[Middleware]:
        return [f.middleware for _, f in self.entries]

    @property
    def routes(self) -> tuple[Route, ...]:
        return tuple(r for _, f in self.entries for r in f.routes)

    @property
    def startup(self) -> tuple[Hook, ...]:
        return tuple(h for _, f in self.entries for h in f.startup)

    @property
    def shutdown(self) -> tuple[Hook, ...]:
        return tuple(h for _, f in self.entries for h in f.shutdown)

    @property
    def before_body(self) -> tuple[Check, ...]:
        return tuple(c for _, f in self.entries for c in f.before_body)

    @property
    def before_upstream(self) -> tuple[Check, ...]:
        return tuple(c for _, f in self.entries for c in f.before_upstream)

    @property
    def handoffs(self) -> tuple[object, ...]:
        return tuple(f.handoff for _, f in self.entries if f.handoff is not None)


# a factory returns its middleware alone, or the Feature it contributes
Factory = Callable[[Any, BuildContext], "Middleware | Feature"]


@dataclass(frozen=True)
class Registered:
    factory: Factory
    options: type[BaseModel] | None
    # types this one should stand after, each with what goes wrong otherwise
    after: tuple[tuple[str, str], ...] = ()


_REGISTRY: dict[str, Registered] = {}


def register(
    name: str, options: type[BaseModel] | None = None, *, after: tuple[tuple[str, str], ...] = ()
) -> Callable[[Factory], Factory]:
    """Register a built-in middleware type under `name`."""

    def deco(factory: Factory) -> Factory:
        _REGISTRY[name] = Registered(factory, options, after)
        return factory

    return deco


def _import_factory(ref: str) -> Factory:
    module_name, _, attr = ref.partition(":")
    module = importlib.import_module(module_name)
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{ref} is not callable")
    return cast(Factory, obj)


def resolve_entries(raw: list[Any]) -> tuple[tuple[MiddlewareEntry, ...], list[str]]:
    """Validate each chain entry against its type's options model."""
    entries: list[MiddlewareEntry] = []
    errors: list[str] = []
    for i, item in enumerate(raw):
        where = f"middleware[{i}]"
        if not isinstance(item, dict):
            errors.append(f"{where}: must be a mapping with a type")
            continue
        kind = item.get("type")
        if not isinstance(kind, str) or not kind:
            errors.append(f"{where}.type: is required")
            continue
        options = {k: v for k, v in item.items() if k != "type"}
        if ":" in kind:
            try:
                _import_factory(kind)
            except Exception as exc:
                errors.append(f"{where}.type: cannot load {kind!r} ({type(exc).__name__}: {exc})")
                continue
            entries.append(MiddlewareEntry(type=kind, options=options))
            continue
        reg = _REGISTRY.get(kind)
        if reg is None:
            known = ", ".join(sorted(_REGISTRY))
            errors.append(
                f"{where}.type: unknown middleware {kind!r} (built-ins: {known}; "
                "or module.path:factory for your own)"
            )
            continue
        if reg.options is None:
            entries.append(MiddlewareEntry(type=kind, options=options))
            continue
        try:
            parsed = reg.options.model_validate(options)
        except ValidationError as exc:
            errors.extend(validation_errors(exc, f"{where}.{kind}"))
            continue
        entries.append(MiddlewareEntry(type=kind, options=parsed))
    return tuple(entries), errors


def build_chain(ctx: BuildContext) -> Chain:
    """Call every factory of the chain, top of the list first."""
    from proxy.config import ConfigError

    built: list[tuple[str, Feature]] = []
    errors: list[str] = []
    for i, entry in enumerate(ctx.config.chain):
        try:
            if ":" in entry.type:
                factory = _import_factory(entry.type)
                made = factory(dict(entry.options or {}), ctx)
            else:
                made = _REGISTRY[entry.type].factory(entry.options, ctx)
        except ConfigError as exc:
            # a factory's own paths (e.g. `keys_file[1].scopes`) continue the entry's
            errors.extend(f"middleware[{i}].{entry.type}.{line}" for line in exc.errors)
            continue
        except Exception as exc:
            errors.append(f"middleware[{i}].{entry.type}: {exc}")
            continue
        feature = made if isinstance(made, Feature) else Feature(made) if callable(made) else None
        if feature is None:
            errors.append(f"middleware[{i}].{entry.type}: the factory did not return a middleware")
            continue
        built.append((entry.type, feature))
    if errors:
        raise ConfigError(errors)
    return Chain(tuple(built))


def order_warnings(entries: tuple[MiddlewareEntry, ...]) -> list[str]:
    """Entries that stand before one they need first (each type's `after`), with both
    paths: such a chain works, but not as its author most likely meant."""
    lines: list[str] = []
    first: dict[str, int] = {}
    for i, entry in enumerate(entries):
        first.setdefault(entry.type, i)
    for i, entry in enumerate(entries):
        reg = _REGISTRY.get(entry.type)
        if reg is None:
            continue
        for needed, why in reg.after:
            j = first.get(needed)
            if j is not None and j > i:
                lines.append(
                    f"middleware[{i}].{entry.type}: stands before middleware[{j}].{needed}; {why}"
                )
    return lines


def compose(middlewares: list[Middleware], terminal: Handler) -> Handler:
    """Nest the chain: the first middleware sees the request first and the response
    last."""
    handler = terminal
    for mw in reversed(middlewares):
        handler = _bind(mw, handler)
    return handler


def _bind(mw: Middleware, nxt: Handler) -> Handler:
    # a plain function handing back the middleware's own awaitable: no coroutine of
    # its own to create and step through for each middleware of each request
    def call(ex: Exchange) -> Awaitable[web.StreamResponse]:
        return mw(ex, nxt)

    return call


def describe(config: LoadedConfig) -> list[str]:
    """Human lines for `chat-proxy check`: the resolved chain and upstreams."""
    lines = ["chain (requests top to bottom, responses bottom to top):"]
    if not config.chain:
        lines.append("  (empty: requests go straight to the upstream)")
    for i, entry in enumerate(config.chain):
        opts = entry.options
        if isinstance(opts, BaseModel):
            shown = opts.model_dump(exclude_defaults=False)
        else:
            shown = opts or {}
        lines.append(f"  {i}. {entry.type} {_brief(shown)}")
    lines.append("upstreams (first match by model wins):")
    for up in config.upstreams:
        lines.append(f"  - {up.name}: {', '.join(up.urls)} models={list(up.models)}")
    store = config.store
    if store.backend == "redis" and store.sentinel is not None:
        where = f"sentinel {', '.join(store.sentinel.hosts)}, service {store.sentinel.service}"
    elif store.backend == "redis":
        where = _redact_url(store.url) + (" (cluster)" if store.cluster else "")
    elif store.backend == "postgres":
        where = _redact_url(store.dsn or "")
    else:
        where = {"sqlite": store.path, "memory": "in process"}[store.backend]
    lines.append(f"store: {store.backend} ({where})")
    return lines


def _redact_url(url: str) -> str:
    from yarl import URL

    try:
        u = URL(url)
        return str(u.with_password("***")) if u.password else url
    except Exception:
        return url


_SECRET_WORDS = ("key", "secret", "password", "token")


def _brief(value: Any) -> str:
    def clean(v: Any, name: str = "") -> Any:
        if isinstance(v, dict):
            return {k: clean(x, str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x, name) for x in v]
        if (
            isinstance(v, str)
            and any(w in name.lower() for w in _SECRET_WORDS)
            and name != "keywords"
        ):
            return "***" if v else v
        return v

    return str(clean(value))
