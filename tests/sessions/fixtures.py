"""Helpers shared by the session tests: the proxy's config with the session
middleware behind a stand-in for auth, chat and Sessions API calls, messages."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.chain import BuildContext
from proxy.exchange import Exchange, Handler, Identity, Middleware

REDIS_URL = "redis://127.0.0.1:6379/0"
ANONYMOUS = "ip:127.0.0.1"  # the owner of a test client's sessions without a key
# `sess_`, 12 hex digits of milliseconds, 32 hex digits (128 bits) at random
GENERATED = re.compile(r"^sess_[0-9a-f]{12}[0-9a-f]{32}$")
Client = TestClient[Any, Any]


def forwarded(owner: str, sid: str) -> str:
    """The id the backend is sent for an owner's session, as documented: a fixed
    function of the two, the same on every replica and after a restart."""
    return "sess_" + hashlib.sha256(f"{owner}\0{sid}".encode()).hexdigest()[:32]


def as_key(options: dict[str, Any], ctx: BuildContext) -> Middleware:
    """Stands in for auth: the caller is the key named in X-Test-Key, if any."""

    async def middleware(ex: Exchange, call_next: Handler) -> web.StreamResponse:
        key = ex.request.headers.get("X-Test-Key")
        if key:
            ex.identity = Identity(
                id=key, scopes=frozenset({"chat", "sessions:read", "sessions:write"})
            )
        return await call_next(ex)

    return middleware


def config(
    store: dict[str, Any],
    options: dict[str, Any] | None = None,
    *,
    url: str = "echo:",
    before: list[dict[str, Any]] | None = None,
) -> str:
    doc = {
        "upstreams": [
            {"name": "main", "url": url, "timeouts": {"connect": 2, "first_byte": 5, "idle": 5}}
        ],
        "store": store,
        "middleware": [
            {"type": "tests.sessions.fixtures:as_key"},
            *(before or []),
            {"type": "session", **(options or {})},
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False)


async def chat(
    client: Client,
    messages: list[dict[str, Any]],
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> tuple[str, dict[str, Any]]:
    """POST a chat request; the session id it was given and the response body."""
    sent = dict(headers or {})
    if key:
        sent["X-Test-Key"] = key
    resp = await client.post(
        "/v1/chat/completions", json={"model": "echo", "messages": messages, **extra}, headers=sent
    )
    doc = await resp.json()
    assert resp.status == 200, doc
    return resp.headers["X-Session-Id"], doc


async def fetch(client: Client, sid: str, key: str | None = None) -> tuple[int, dict[str, Any]]:
    resp = await client.get(f"/v1/sessions/{sid}", headers={"X-Test-Key": key} if key else {})
    return resp.status, await resp.json()


def said(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": f"You said: {text}"}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}
