"""The middleware registry and the chain builder.

A middleware is a plain `async (exchange, call_next) -> StreamResponse`. A built-in
type registers a factory and the pydantic model of its options; a user's own is named
`module.path:factory` and receives its options as a dict. The whole chain is
validated and built once, at start-up or reload, never per request.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import web
from pydantic import BaseModel, ValidationError

from proxy.config import LoadedConfig, MiddlewareEntry, validation_errors
from proxy.exchange import Exchange, Handler, Middleware


@dataclass
class BuildContext:
    """What a middleware factory may use: the whole config, the store, and hooks run
    when the application starts and stops."""

    config: LoadedConfig
    store: Any = None
    startup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    services: dict[str, Any] = field(default_factory=dict)
    # checks run before a client that sent `Expect: 100-continue` is asked for its
    # body (auth's key and scope check): a refusal goes out without reading it
    before_body: list[Callable[[Exchange], object]] = field(default_factory=list)
    # the services of the chain this one replaces (a reload), for state that must
    # outlive it: the in-process rate limiter's counters
    previous: dict[str, Any] = field(default_factory=dict)


Factory = Callable[[Any, BuildContext], Middleware]


@dataclass(frozen=True)
class Registered:
    factory: Factory
    options: type[BaseModel] | None
    changes_response: bool = False


_REGISTRY: dict[str, Registered] = {}


def register(
    name: str, options: type[BaseModel] | None = None, *, changes_response: bool = False
) -> Callable[[Factory], Factory]:
    """Register a built-in middleware type under `name`."""

    def deco(factory: Factory) -> Factory:
        _REGISTRY[name] = Registered(factory, options, changes_response)
        return factory

    return deco


def _load_builtins() -> None:
    import proxy.middleware  # noqa: F401  (registers the built-ins)


def registered_types() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


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
    _load_builtins()
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


def build_middlewares(ctx: BuildContext) -> list[tuple[str, Middleware]]:
    """Call every factory of the chain, top of the list first."""
    from proxy.config import ConfigError

    _load_builtins()
    built: list[tuple[str, Middleware]] = []
    errors: list[str] = []
    for i, entry in enumerate(ctx.config.chain):
        try:
            if ":" in entry.type:
                factory = _import_factory(entry.type)
                mw = factory(dict(entry.options or {}), ctx)
            else:
                mw = _REGISTRY[entry.type].factory(entry.options, ctx)
        except ConfigError as exc:
            # a factory's own paths (e.g. `keys_file[1].scopes`) continue the entry's
            errors.extend(f"middleware[{i}].{entry.type}.{line}" for line in exc.errors)
            continue
        except Exception as exc:
            errors.append(f"middleware[{i}].{entry.type}: {exc}")
            continue
        if not inspect.iscoroutinefunction(mw) and not callable(mw):
            errors.append(f"middleware[{i}].{entry.type}: the factory did not return a middleware")
            continue
        built.append((entry.type, mw))
    if errors:
        raise ConfigError(errors)
    return built


def compose(middlewares: list[tuple[str, Middleware]], terminal: Handler) -> Handler:
    """Nest the chain: the first middleware sees the request first and the response
    last."""
    handler = terminal
    for _, mw in reversed(middlewares):
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
        lines.append(f"  - {up.name}: {up.url} models={list(up.models)}")
    store = config.store
    where = {"sqlite": store.path, "redis": _redact_url(store.url), "memory": "in process"}[
        store.backend
    ]
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
