"""Helpers shared by the rate-limit tests: the Redis they count in, a stand-in for
auth that calls as a named key, and a clock that moves only when told."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from proxy.chain import BuildContext
from proxy.config import Limits
from proxy.exchange import Exchange, Handler, Identity, Middleware

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
