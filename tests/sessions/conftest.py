"""Fixtures shared by the session tests: stores, opened or as the config names them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy.config import StoreConfig
from proxy.sessions.store import SessionStore, open_store
from tests.sessions.fixtures import REDIS_URL


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    """A session store of each in-process kind (the contract suite,
    tests/contract/test_session_stores.py, adds Redis for itself)."""
    cfg = StoreConfig(backend=request.param, path=str(tmp_path / "s.db"))  # type: ignore[arg-type]
    opened = await open_store(cfg)
    yield opened
    await opened.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> dict[str, Any]:
    return {"backend": "sqlite", "path": str(tmp_path / "sessions.db")}


@pytest.fixture
async def redis_store() -> AsyncIterator[dict[str, Any]]:
    prefix = f"chat-proxy-test:{uuid.uuid4().hex}:"
    yield {"backend": "redis", "url": REDIS_URL, "prefix": prefix}
    r = aioredis.from_url(REDIS_URL)
    keys = [k async for k in r.scan_iter(match=prefix + "*")]
    if keys:
        await r.delete(*keys)
    await r.aclose()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def any_store(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "memory":
        return {"backend": "memory"}
    value: dict[str, Any] = request.getfixturevalue(f"{request.param}_store")
    return value


@pytest.fixture(params=["sqlite", "redis"])
def shared_store(request: pytest.FixtureRequest) -> dict[str, Any]:
    value: dict[str, Any] = request.getfixturevalue(f"{request.param}_store")
    return value
