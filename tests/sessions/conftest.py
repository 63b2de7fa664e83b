"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.config import StoreConfig
from proxy.store import SessionStore, open_store


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    """A session store of each in-process kind (test_store.py adds Redis for itself)."""
    cfg = StoreConfig(backend=request.param, path=str(tmp_path / "s.db"))  # type: ignore[arg-type]
    opened = await open_store(cfg)
    yield opened
    await opened.close()
