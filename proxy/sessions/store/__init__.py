"""Where sessions and stored responses live: one protocol, four implementations (memory,
SQLite, Redis, PostgreSQL)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from proxy.config import ConfigError, StoreConfig
from proxy.sessions.store.base import (
    Page,
    Session,
    SessionStore,
    StoredResponse,
    TurnRecord,
    UnknownCursor,
)
from proxy.sessions.store.memory import MemoryStore

__all__ = [
    "MemoryStore",
    "Page",
    "Session",
    "SessionStore",
    "StoredResponse",
    "TurnRecord",
    "UnknownCursor",
    "open_store",
]

if TYPE_CHECKING:
    from proxy.shared_redis import SharedRedis

log = logging.getLogger("chat_proxy")


async def open_store(cfg: StoreConfig, pool: SharedRedis | None = None) -> SessionStore:
    """Open the configured store. A Redis server that does not answer yet is not an
    error here: the proxy starts, /readyz reports the store as down until it does."""
    if cfg.backend == "sqlite":
        import sqlite3

        from proxy.sessions.store.sqlite import SQLiteStore

        try:
            return await SQLiteStore.open(cfg.path)
        except (sqlite3.Error, OSError, RuntimeError) as exc:
            raise ConfigError([f"store.path: cannot open {cfg.path} for writing ({exc})"]) from None
    if cfg.backend == "redis":
        from proxy.sessions.store.redis import RedisStore
        from proxy.shared_redis import open_pool

        # on the application's shared connections; else (Sentinel or a cluster) its own
        own = pool is None and (cfg.sentinel is not None or cfg.cluster)
        store = RedisStore(cfg.url, cfg.prefix, open_pool(cfg) if own else pool, owns_pool=own)
        try:
            await asyncio.wait_for(store.ping(), 3)
        except Exception as exc:
            log.warning("the session store does not answer yet: %s", exc)
        return store
    if cfg.backend == "postgres":
        from proxy.pgstore import open_database
        from proxy.sessions.store.postgres import PostgresStore

        # the same rule for a PostgreSQL server; a refusal that will not pass by itself
        # (a wrong password, no such database, a newer schema) is a ConfigError
        return PostgresStore(await open_database(cfg.dsn))
    return MemoryStore(cfg.max_sessions)
