"""Where sessions live: one protocol, three implementations (memory, SQLite, Redis)."""

from __future__ import annotations

from typing import Any

from proxy.config import StoreConfig


async def open_store(cfg: StoreConfig) -> Any:
    """Open the configured store."""
    raise NotImplementedError("stores are not available yet")
