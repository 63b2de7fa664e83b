"""Helpers shared by the rate-limit tests: the Redis they count in, a stand-in for
auth that calls as a named key, the config and requests of a limited proxy, and a
clock that moves only when told."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from proxy.chain import BuildContext
from proxy.config import Limits
from proxy.exchange import Exchange, Handler, Identity, Middleware
from tests.fixtures import (
    BASIC,
    chat_body,
    chunk,
    completion,
    json_handler,
)

REDIS_URL = "redis://127.0.0.1:6379/0"


def require_redis(host: str = "127.0.0.1", port: int = 6379) -> None:
    """Skip when no Redis answers here, except under CI=true, where that fails."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            if not sock.recv(16).startswith(b"+PONG"):
                raise OSError("not a Redis server")
    except OSError as exc:
        reason = f"no Redis at {host}:{port} ({exc})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires it")
        pytest.skip(f"{reason}: start one to run the Redis rate-limit tests")


async def drop_keys(prefix: str, url: str = REDIS_URL) -> None:
    client = Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def keyed(options: dict[str, Any], ctx: BuildContext) -> Middleware:
    """A stand-in for auth: `X-Test-Key: NAME` calls as key NAME with the limits of
    `keys.NAME` (none when absent); no header: anonymous."""
    limits = {name: Limits(**(value or {})) for name, value in (options.get("keys") or {}).items()}

    async def middleware(ex: Exchange, call_next: Handler) -> web.StreamResponse:
        name = ex.request.headers.get("X-Test-Key")
        if name is not None:
            ex.identity = Identity(
                id=name, scopes=frozenset({"chat", "models"}), limits=limits.get(name)
            )
        return await call_next(ex)

    return middleware


class FakeClock:
    """A clock for the in-process limiter: `now` moves when a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def config(limits: str, store: str = "store: {backend: memory}\n", keys: str = "{}") -> str:
    """A proxy with the stand-in auth and a rate_limit whose options are `limits`, a
    YAML flow mapping."""
    options = limits.strip().removeprefix("{").removesuffix("}")
    return (
        BASIC
        + store
        + f"""
middleware:
  - type: tests.ratelimit.fixtures:keyed
    keys: {keys}
  - {{type: rate_limit, {options}}}
"""
    )


async def post(
    client: TestClient[Any, Any], body: dict[str, Any] | None = None, key: str | None = None
) -> Any:
    headers = {"X-Test-Key": key} if key else {}
    return await client.post("/v1/chat/completions", json=body or chat_body(), headers=headers)


async def refusals(client: TestClient[Any, Any], limit: str) -> float:
    """The chat_proxy_rate_limit_refusals_total counter for `limit` in /metrics."""
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(f'chat_proxy_rate_limit_refusals_total{{limit="{limit}"}}'):
            return float(line.split()[-1])
    return 0.0


def usage_handler(total: int, prompt: int = 5) -> Any:
    return json_handler(
        completion(
            usage={
                "prompt_tokens": prompt,
                "completion_tokens": total - prompt,
                "total_tokens": total,
            }
        )
    )


# chat_body("Hi") is reckoned at 8 prompt tokens: ceil(2 chars / 4) + 4 per message + 3
HI_PROMPT = 8


STREAM = [chunk("", role="assistant"), chunk("Hello"), chunk(" there"), chunk(None, finish="stop")]
