"""The configuration file: YAML, `${VAR}` interpolation, strict validation.

Every error carries its path in the file (`middleware[2].rate_limit.requests_per_minute:
must be a positive integer`) and all errors are reported at once.

Why one module of over 400 lines: every section of the file is a model here, so that
the whole configuration (and every default) reads in one place, in the order of the
README's reference.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

ENV_VAR = "CHAT_PROXY_CONFIG"
# set by `serve --workers N` in each worker: N
WORKERS_ENV = "CHAT_PROXY_WORKERS"


class ConfigError(Exception):
    """A configuration that cannot be used; `errors` lists `path: message` lines."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class Model(BaseModel):
    """Base of every config section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(Model):
    """Rate limits of a key or the defaults of the rate_limit middleware; None: no
    limit of that kind."""

    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)
    max_concurrent: int | None = Field(None, gt=0)


class ClientTimeouts(Model):
    """Limits on what a client may hold (seconds)."""

    header: float = Field(60, gt=0)  # the request head must arrive within this: else 408
    body: float = Field(60, gt=0)  # the longest pause between two reads of a body: else 408
    keepalive: float = Field(75, gt=0)  # an idle client connection is closed after this
    send: float = Field(60, gt=0)  # a client that takes nothing of a response this long


class ServerConfig(Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)
    keepalive_seconds: float = Field(15, ge=0)
    timeouts: ClientTimeouts = ClientTimeouts()
    # a non-streamed answer that a middleware must parse, when larger: 502 (answers no
    # middleware needs stream through whatever their size)
    max_response_bytes: int = Field(64 * 1024 * 1024, gt=0)
    drain_seconds: float = Field(30, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: uvloop where it is installed (it is a dependency on Linux and macOS)
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    # hand glibc's free memory back to the system this often (0: never)
    trim_memory_seconds: float = Field(60, ge=0)
    # load balancers whose X-Forwarded-For names the client (addresses or networks):
    # anonymous callers behind them are told apart (rate limits, sessions) by the
    # address they forwarded, not by the balancer's
    trusted_proxies: tuple[str, ...] = ()
    # client connections one process takes; one more gets a 503 (default: what the
    # open-file limit leaves once the upstreams' pools are counted; proxy/capacity.py)
    max_connections: int | None = Field(None, gt=0)

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return value

    @field_validator("event_loop")
    @classmethod
    def _event_loop(cls, value: str) -> str:
        if value == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise ValueError("uvloop is not installed (pip install uvloop), or use auto")
        return value


class Timeouts(Model):
    connect: float = Field(5, gt=0)
    pool: float = Field(10, gt=0)  # the longest wait for a place in a full pool
    first_byte: float = Field(120, gt=0)
    idle: float = Field(120, gt=0)


class Retries(Model):
    attempts: int = Field(1, ge=1, le=10)
    backoff_initial: float = Field(0.2, ge=0)
    backoff_max: float = Field(5, ge=0)
    retry_after_max: float = Field(10, ge=0)


class Circuit(Model):
    failures: int = Field(5, ge=1)
    cooldown: float = Field(30, gt=0)


class UpstreamTls(Model):
    """TLS towards an https:// upstream: a CA bundle to trust instead of the system's,
    a client certificate and key (mTLS), or no verification at all."""

    ca_file: str | None = None
    cert_file: str | None = None  # PEM; may hold the key too
    key_file: str | None = None
    verify: bool = True

    @field_validator("key_file")
    @classmethod
    def _key_needs_cert(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("cert_file") is None:
            raise ValueError("needs cert_file (the client certificate it belongs to)")
        return value


class Affinity(Model):
    # a replica above load_factor x the mean load passes its excess on
    load_factor: float = Field(1.25, ge=1.0)


class LoadSignal(Model):
    # poll each replica's /metrics: vLLM's or llama.cpp server's gauges; none: only
    # the requests in flight from this proxy
    metrics: Literal["vllm", "llamacpp", "none"] = "none"
    interval: float = Field(1, gt=0)


class Hedge(Model):
    # > 0: a chat request with no first byte after this long also goes to another
    # replica; 0: never
    after_ms: float = Field(0, ge=0)


def _check_url(value: str) -> str:
    if value.startswith("echo:"):
        return value
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError("must be an http:// or https:// URL, or echo:")
    return value.rstrip("/")


class UpstreamConfig(Model):
    name: str = Field(min_length=1)
    url: str | None = Field(None, min_length=1)
    # instead of url: several servers of the same models
    replicas: tuple[str, ...] = ()
    api_key: str = ""
    models: tuple[str, ...] = ("*",)
    weight: float = Field(1, gt=0)
    timeouts: Timeouts = Timeouts()
    retries: Retries = Retries()
    circuit: Circuit = Circuit()
    max_connections: int = Field(100, gt=0)
    # which backend client: the proxy's own HTTP/1.1 client, or aiohttp's
    client: Literal["http1", "aiohttp"] = "http1"
    tls: UpstreamTls = UpstreamTls()
    # an idle backend connection is closed after this many seconds
    idle_seconds: float = Field(15, gt=0)
    # how a request picks a replica (affinity when unset)
    balance: Literal["affinity", "least_busy", "round_robin"] = "affinity"
    affinity: Affinity = Affinity()
    load: LoadSignal = LoadSignal()
    # per replica; beyond it requests wait in the admission queue (`queue`)
    max_in_flight: int | None = Field(None, gt=0)
    hedge: Hedge = Hedge()
    # POST /v1/responses: translated to Chat Completions, or relayed to the backend's
    # own /v1/responses
    responses: Literal["translate", "native"] = "translate"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value)

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        urls = tuple(_check_url(v) for v in value)
        dupes = sorted({u for u in urls if urls.count(u) > 1})
        if dupes:
            raise ValueError(f"replicas must be distinct: {', '.join(dupes)} more than once")
        return urls

    @model_validator(mode="after")
    def _one_address(self) -> UpstreamConfig:
        if (self.url is None) == (not self.replicas):
            raise ValueError("give either `url` or `replicas`, not both and not neither")
        return self

    @property
    def urls(self) -> tuple[str, ...]:
        """The replicas' base URLs; one for an upstream with `url`."""
        return self.replicas if self.url is None else (self.url,)


class QueueConfig(Model):
    """Admission when every replica that could serve a request is full."""

    max_waiting: int = Field(1000, ge=0)  # more: 429 with Retry-After
    max_wait_seconds: float = Field(30, gt=0)  # waited longer: 503 with Retry-After


class SentinelConfig(Model):
    """Redis Sentinel: the store's master is the one the sentinels at `hosts` name for
    `service`, followed through a failover. The user, password, database and scheme
    (rediss://) of `store.url` still apply to the master; its host and port do not."""

    hosts: tuple[str, ...] = Field(min_length=1)  # "host:port" of each sentinel
    service: str = Field(min_length=1)  # the name in `sentinel monitor NAME ...`
    # the sentinels' own credentials (their requirepass / ACL user), if they have any
    username: str | None = None
    password: str | None = None

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for host in value:
            name, sep, port = host.rpartition(":")
            if not sep or not name or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{host!r}: each sentinel must be host:port")
        return value

    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for host in self.hosts:
            name, _, port = host.rpartition(":")
            out.append((name.removeprefix("[").removesuffix("]"), int(port)))
        return out


class StoreConfig(Model):
    backend: Literal["memory", "sqlite", "redis", "postgres"] = "memory"
    path: str = "data/chat-proxy.db"
    url: str = "redis://127.0.0.1:6379/0"
    # postgres: the database of the sessions, stored responses and rate-limit counters
    dsn: str = Field("postgresql://127.0.0.1:5432/chat_proxy", pattern=r"^postgres(ql)?://")
    prefix: str = "chat-proxy:"
    # memory: the most sessions kept, the least recently updated evicted first
    max_sessions: int = Field(100_000, gt=0)
    # redis: find the master through Redis Sentinel (url's host and port unused)
    sentinel: SentinelConfig | None = None
    # redis: url names one node of a Redis Cluster; the client finds the others
    cluster: bool = False

    @model_validator(mode="after")
    def _redis_topology(self) -> StoreConfig:
        if self.sentinel is not None and self.cluster:
            raise ValueError("give `sentinel` or `cluster: true`, not both")
        if self.cluster and re.search(r"^rediss?://[^/]*/0*[1-9]", self.url):
            raise ValueError("cluster: true needs database 0 in url (a Redis Cluster has no other)")
        return self


class ObservabilityConfig(Model):
    # OTLP over HTTP (a collector's base URL; traces go to {otlp_endpoint}/v1/traces);
    # unset: no tracing at all
    otlp_endpoint: str | None = None
    service_name: str = Field("chat-proxy", min_length=1)

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")


class MiddlewareEntry(Model):
    """One entry of the chain after validation: its type and its typed options."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    type: str
    options: Any = None


class Config(Model):
    server: ServerConfig = ServerConfig()
    upstreams: tuple[UpstreamConfig, ...] = Field(min_length=1)
    store: StoreConfig = StoreConfig()
    queue: QueueConfig = QueueConfig()
    observability: ObservabilityConfig = ObservabilityConfig()
    middleware: tuple[dict[str, Any], ...] = ()

    @field_validator("upstreams")
    @classmethod
    def _unique_names(cls, value: tuple[UpstreamConfig, ...]) -> tuple[UpstreamConfig, ...]:
        names = [u.name for u in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"upstream names must be unique: {', '.join(dupes)}")
        return value


@dataclass(frozen=True)
class LoadedConfig:
    """A validated configuration with its chain entries resolved."""

    config: Config
    chain: tuple[MiddlewareEntry, ...]
    source: Path | None

    @property
    def server(self) -> ServerConfig:
        return self.config.server

    @property
    def upstreams(self) -> tuple[UpstreamConfig, ...]:
        return self.config.upstreams

    @property
    def store(self) -> StoreConfig:
        return self.config.store

    @property
    def queue(self) -> QueueConfig:
        return self.config.queue

    @property
    def observability(self) -> ObservabilityConfig:
        return self.config.observability


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str], path: str, errors: list[str]) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of a YAML tree."""
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = env.get(name)
            # as in the shell: `${VAR:-default}` takes the default when VAR is unset or
            # empty; `${VAR}` takes an empty VAR as it is
            if value is not None and (value != "" or default is None):
                return value
            if default is not None:
                return default
            errors.append(f"{path or '<root>'}: environment variable {name} is not set")
            return ""

        return _VAR.sub(sub, value) if "${" in value else value
    if isinstance(value, dict):
        if re.fullmatch(r"middleware\[\d+\]", path) and isinstance(value.get("type"), str):
            path = f"{path}.{value['type']}"  # paths name the middleware, as validation does
        return {
            k: interpolate(v, env, f"{path}.{k}" if path else str(k), errors)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [interpolate(v, env, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    return value


def format_loc(loc: tuple[int | str, ...], prefix: str = "") -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def _message(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "is required"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "must be an integer"
    if kind in ("float_type", "float_parsing"):
        return "must be a number"
    if kind in ("bool_type", "bool_parsing"):
        return "must be true or false"
    if kind in ("string_type",):
        return "must be a string"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "must be a mapping"
    if kind in ("list_type", "tuple_type"):
        return "must be a list"
    if kind == "greater_than" and ctx.get("gt") == 0:
        return (
            "must be a positive number"
            if isinstance(err.get("input"), float)
            else ("must be a positive integer")
        )
    if kind == "greater_than":
        return f"must be greater than {ctx.get('gt')}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}"
    if kind == "less_than":
        return f"must be less than {ctx.get('lt')}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "string_too_short":
        return (
            "must not be empty"
            if ctx.get("min_length") == 1
            else f"must be at least {ctx.get('min_length')} characters"
        )
    if kind == "too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else str(err.get("msg"))
    if kind == "value_error":
        return str(ctx.get("error", err.get("msg")))
    return str(err.get("msg", "is invalid"))


def validation_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    return [f"{format_loc(tuple(e['loc']), prefix)}: {_message(e)}" for e in exc.errors()]


@dataclass(frozen=True)
class Parsed:
    """A file's shape, checked: the config (None when it has errors), the chain's
    entries as they were written (their options are the chain's to check), and the
    errors found so far."""

    config: Config | None
    chain: list[Any] | None
    errors: list[str]


def parse_text(text: str, *, env: Mapping[str, str] | None = None) -> Parsed:
    """Parse, interpolate and validate the file's shape (servers, upstreams, store);
    the middleware entries are checked by proxy/chain.py (see proxy/loader.py)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        return Parsed(
            None, None, [f"<file>: {where}not valid YAML ({getattr(exc, 'problem', exc)})"]
        )
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        return Parsed(None, None, ["<root>: must be a mapping"])
    errors: list[str] = []
    data = interpolate(raw, os.environ if env is None else env, "", errors)
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors.extend(validation_errors(exc))
    chain_raw = data.get("middleware") if isinstance(data, dict) else None
    return Parsed(config, chain_raw if isinstance(chain_raw, list) else None, errors)


def read_file(
    path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> tuple[str, Path]:
    """The text of the configuration file named by `path` or by CHAT_PROXY_CONFIG."""
    environ = os.environ if env is None else env
    name = path or environ.get(ENV_VAR)
    if not name:
        raise ConfigError([f"no configuration file: pass --config FILE or set {ENV_VAR}"])
    p = Path(name)
    try:
        return p.read_text(encoding="utf-8"), p
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read ({exc.strerror or exc})"]) from None
