"""API keys with scopes and a model allowlist.

The key is read from `X-API-Key` (or the configured `header:`) or from
`Authorization: Bearer <key>`, which the OpenAI SDKs send. Keys are configured by
their SHA-256 (`key_sha256`), or in plain form (`key: ${ENV}`) which is hashed while
the file is loaded and not kept; `keys_file:` names a YAML list of more entries.

On the sessions page's paths (/ui, scope `admin`; proxy/ui/), which this middleware
contributes, a browser may log in with HTTP Basic, the key as the password: a 401
there asks for it with `WWW-Authenticate: Basic`, so that the browser prompts. Basic
is accepted there only: a browser sends the credentials it remembers with any request
to this origin, even one another site's page makes, and the page's paths only read.

A caller is identified by the SHA-256 of what it sent: the digest is looked up in a
dict. Whatever timing that lookup shows depends on the digest only, and a key that
shares a prefix with a configured one has a digest that shares nothing with it, so
no partial match can be measured.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from aiohttp import web
from pydantic import Field, ValidationError, field_validator, model_validator

from proxy.chain import BuildContext, Feature, register
from proxy.config import ConfigError, Limits, Model, interpolate, validation_errors
from proxy.errors import ProxyError
from proxy.exchange import BodyTransform, Exchange, Handler, Identity
from proxy.routes import MODELS
from proxy.ui import UI_ROUTE

Scope = Literal["chat", "models", "sessions:read", "sessions:write", "admin"]
SCOPES: tuple[str, ...] = get_args(Scope)

_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
# headers the proxy reads, logs or sets for its own use: a key sent in one of them
# would be echoed or written to the log
_RESERVED_HEADERS = {
    "host",
    "content-type",
    "content-length",
    "transfer-encoding",
    "connection",
    "x-request-id",
    "x-session-id",
}


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


class KeyEntry(Model):
    """One API key: its id, its digest, and what it may do."""

    id: str
    key_sha256: str | None = None
    # the plain key is replaced by its digest before validation and never stored;
    # the field exists so that a non-string value is reported at its own path
    key: str | None = Field(None, exclude=True, repr=False)
    scopes: tuple[Scope, ...] = Field(("chat", "models"), min_length=1)
    models: tuple[str, ...] = Field(("*",), min_length=1)
    limits: Limits | None = None
    model: str | None = None
    # the admission queue serves higher priorities first and, within one, keys in
    # proportion to their weights
    priority: int = Field(0, ge=0, le=9)
    weight: float = Field(1, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _hash_plain_key(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("key_sha256") is not None:
            return data
        plain = data.get("key")
        if not isinstance(plain, str) or not plain.strip():
            return data
        data = {k: v for k, v in data.items() if k != "key"}
        data["key_sha256"] = sha256_hex(plain.strip())
        return data

    @field_validator("id", "model")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("key")
    @classmethod
    def _plain_left(cls, value: str | None) -> None:
        # a plain key that reaches here was not hashed: it is empty, or key_sha256 is
        # given too
        if value is None:
            return None
        if not value.strip():
            raise ValueError("must not be empty")
        raise ValueError("give either key or key_sha256, not both")

    @field_validator("key_sha256")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _SHA256_HEX.match(value):
            raise ValueError("must be 64 hexadecimal characters (the SHA-256 of the key)")
        return value.lower()

    @model_validator(mode="after")
    def _has_key(self) -> KeyEntry:
        if self.key_sha256 is None:
            raise ValueError("key_sha256 (or key) is required")
        return self

    def identity(self) -> Identity:
        return Identity(
            id=self.id,
            scopes=frozenset(self.scopes),
            models=self.models,
            limits=self.limits,
            model=self.model,
            priority=self.priority,
            weight=self.weight,
        )


def _duplicates(entries: list[tuple[str, KeyEntry]]) -> list[str]:
    """`where: message` for entries that repeat an id or a key."""
    errors: list[str] = []
    ids: dict[str, str] = {}
    digests: dict[str, str] = {}
    for where, entry in entries:
        if entry.id in ids:
            errors.append(f"{where}.id: duplicate id {entry.id!r} (also at {ids[entry.id]})")
        else:
            ids[entry.id] = where
        digest = entry.key_sha256 or ""
        if digest in digests:
            errors.append(f"{where}: the same key as {digests[digest]}")
        else:
            digests[digest] = where
    return errors


class AuthOptions(Model):
    header: str = "X-API-Key"
    keys: tuple[KeyEntry, ...] = ()
    keys_file: str | None = None

    @field_validator("header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not _TOKEN.match(value):
            raise ValueError("must be an HTTP header name")
        if value.lower() in _RESERVED_HEADERS:
            raise ValueError(f"{value} is used by the proxy itself; choose another header")
        return value

    @field_validator("keys_file")
    @classmethod
    def _file(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _some_keys(self) -> AuthOptions:
        if not self.keys and self.keys_file is None:
            raise ValueError("give keys, keys_file or both")
        return self


def read_keys_file(name: str, env: Mapping[str, str] | None = None) -> list[KeyEntry]:
    """The entries of a keys file (a YAML list), or ConfigError with `keys_file[i]...`
    paths. Messages never quote the file's content: it may hold plain keys."""
    path = Path(name)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"keys_file: cannot read {name} ({exc.strerror or exc})"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError([f"keys_file: {name} is not valid YAML{where}"]) from None
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise ConfigError([f"keys_file: {name} must hold a list of key entries"])
    errors: list[str] = []
    items = interpolate(raw, os.environ if env is None else env, "keys_file", errors)
    entries: list[KeyEntry] = []
    for i, item in enumerate(items):
        try:
            entries.append(KeyEntry.model_validate(item))
        except ValidationError as exc:
            errors.extend(validation_errors(exc, f"keys_file[{i}]"))
    if errors:
        raise ConfigError(errors)
    return entries


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def basic_password(value: str | None) -> str | None:
    """The key in `Authorization: Basic base64(user:key)`: the password, or the user
    name when the password is empty (the user name is otherwise not looked at)."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        text = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, _, password = text.partition(":")
    return password.strip() or user.strip() or None


def presented_key(headers: Mapping[str, str], header: str) -> str | None:
    """The key a request carries: the configured header first, then Bearer."""
    if header.lower() != "authorization":
        value = headers.get(header, "").strip()
        if value:
            return value
    return _bearer(headers.get("Authorization"))


def _models_filter(ex: Exchange, identity: Identity) -> BodyTransform:
    """Keeps the /v1/models entries the key may use, judged on the model each id
    resolves to (an alias added by model_override counts as its target)."""

    def transform(doc: dict[str, Any]) -> dict[str, Any]:
        items = doc.get("data")
        if not isinstance(items, list):
            return doc
        resolve: Callable[[str], str] = ex.model_resolver or (lambda name: name)
        kept = [
            item
            for item in items
            if isinstance(item, dict)
            and isinstance(item.get("id"), str)
            and identity.may_use(resolve(item["id"]))
        ]
        return {**doc, "data": kept}

    return transform


# what a browser is asked for on the page's paths: it prompts for a user and password
_BASIC = 'Basic realm="chat-proxy", charset="UTF-8"'


def _missing_key(header: str, browser: bool = False) -> ProxyError:
    if browser:
        return ProxyError(
            401,
            "The sessions page needs an API key with the admin scope: give the key as the "
            "password when the browser asks (any user name), or send it as Authorization: "
            f"Bearer YOUR_KEY or in the {header} header.",
            code="missing_api_key",
            headers={"WWW-Authenticate": _BASIC},
        )
    return ProxyError(
        401,
        "You didn't provide an API key. You need to provide your API key in an "
        "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), "
        f"or in the {header} header.",
        code="missing_api_key",
        headers={"WWW-Authenticate": 'Bearer realm="chat-proxy"'},
    )


def _wrong_key(header: str, browser: bool = False) -> ProxyError:
    return ProxyError(
        401,
        "Incorrect API key provided. Check the key you send in the "
        f"{header} header or as Authorization: Bearer"
        + (" (or as the password of Basic auth)." if browser else "."),
        code="invalid_api_key",
        headers={
            "WWW-Authenticate": _BASIC
            if browser
            else 'Bearer realm="chat-proxy", error="invalid_token"'
        },
    )


@register("auth", AuthOptions)
def auth(options: AuthOptions, ctx: BuildContext) -> Feature:
    entries = [(f"keys[{i}]", e) for i, e in enumerate(options.keys)]
    if options.keys_file is not None:
        from_file = read_keys_file(options.keys_file)
        entries += [(f"keys_file[{i}]", e) for i, e in enumerate(from_file)]
    errors = _duplicates(entries)
    if errors:
        raise ConfigError(errors)
    by_digest: dict[bytes, Identity] = {
        bytes.fromhex(e.key_sha256 or ""): e.identity() for _, e in entries
    }
    header = options.header
    drop = header.lower()
    custom_header = drop not in ("x-api-key", "authorization")

    def authenticate(ex: Exchange) -> Identity:
        headers = ex.request.headers
        key = presented_key(headers, header)
        browser = ex.route is UI_ROUTE
        if key is None and browser:
            key = basic_password(headers.get("Authorization"))
        if key is None:
            raise _missing_key(header, browser)
        identity = by_digest.get(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest())
        if identity is None:
            raise _wrong_key(header, browser)
        ex.identity = identity  # a refusal below is logged with the key's id
        if ex.scope is not None and ex.scope not in identity.scopes:
            raise ProxyError(
                403,
                "You have insufficient permissions for this operation. "
                f"Missing scope: {ex.scope} (key '{identity.id}').",
                code="missing_scope",
            )
        return identity

    def allowed(ex: Exchange) -> None:
        """The model, once every middleware that may change it has run, is one the
        key may use (whatever the body's Content-Type, form fields included)."""
        identity = ex.identity
        if identity is None or (ex.body is None and not ex.form):
            return
        if not identity.may_use(ex.model):
            raise ProxyError(
                403,
                f"The key '{identity.id}' may not use the model `{ex.model}`."
                if ex.model
                else f"The key '{identity.id}' must name a model it may use.",
                param="model",
                code="model_not_allowed",
            )

    def auth_middleware(ex: Exchange, call_next: Handler) -> Awaitable[web.StreamResponse]:
        # a plain function handing on the next handler's awaitable: no coroutine of
        # its own alive for the whole of a stream
        if custom_header:
            ex.upstream_drop_headers.add(drop)
        identity = authenticate(ex)
        if ex.route is MODELS and "*" not in identity.models:
            ex.body_transforms.append(_models_filter(ex, identity))
        return call_next(ex)

    # the sessions page comes with the keys: it is for keys with the admin scope
    return Feature(
        auth_middleware,
        routes=(UI_ROUTE,),
        before_body=(authenticate,),
        before_upstream=(allowed,),
    )
