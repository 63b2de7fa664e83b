"""The schema the proxy creates and migrates itself: a version table, an older layout
upgraded at start with its rows kept, a newer version refused (exit 2 at start), and
replicas that start together migrating once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from proxy.config import ConfigError, StoreConfig
from proxy.pgstore import MIGRATIONS, Database, Migration, migrate, open_database, schema_version
from proxy.sessions.store import StoredResponse, open_store
from proxy.sessions.store.postgres import PostgresStore
from tests.postgres.server import PostgresServer

ROOT = Path(__file__).resolve().parents[2]
LATEST = MIGRATIONS[-1].version

# "version 0": the session tables as an unversioned database holds them (no version
# table, no writers column, no stored responses, no rate-limit counters)
V0_LAYOUT = """
CREATE SCHEMA chat_proxy;
CREATE TABLE chat_proxy.sessions (
    owner text COLLATE "C" NOT NULL, id text COLLATE "C" NOT NULL,
    created double precision NOT NULL, updated double precision NOT NULL,
    source text NOT NULL, key_id text, model text,
    turn_count bigint NOT NULL DEFAULT 0, prompt_tokens bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0, total_tokens bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (owner, id));
CREATE TABLE chat_proxy.turns (
    owner text COLLATE "C" NOT NULL, session_id text COLLATE "C" NOT NULL,
    seq bigint NOT NULL, data text NOT NULL, PRIMARY KEY (owner, session_id, seq));
CREATE TABLE chat_proxy.history (
    owner text COLLATE "C" NOT NULL, digest text COLLATE "C" NOT NULL,
    session_id text COLLATE "C" NOT NULL, PRIMARY KEY (owner, digest));
INSERT INTO chat_proxy.sessions VALUES ('key-a', 'sess_old', 1000, 1000, 'new', 'key-a', 'm1', 1, 3, 2, 5);
INSERT INTO chat_proxy.turns VALUES ('key-a', 'sess_old', 1, '{"messages": [{"role": "user", "content": "old ✓"}]}');
INSERT INTO chat_proxy.history VALUES ('key-a', 'd-old', 'sess_old');
"""

# a later proxy's migration, to stand for a schema newer than this one knows
FUTURE = Migration(LATEST + 1, "a later proxy's change", "CREATE TABLE chat_proxy.later (x int)")


def response() -> StoredResponse:
    return StoredResponse("resp_1", "key-a", 2000.0, "sess_old", '{"id":"resp_1"}', "[]")


async def test_a_new_database_gets_the_schema_and_its_version(pg_dsn: str) -> None:
    db = await open_database(pg_dsn)
    try:
        rows = await db.fetch(5, "SELECT version, description FROM chat_proxy.schema_version")
        assert [r["version"] for r in rows] == [m.version for m in MIGRATIONS]
        tables = {
            r["tablename"]
            for r in await db.fetch(
                5, "SELECT tablename FROM pg_tables WHERE schemaname = 'chat_proxy'"
            )
        }
        assert {"sessions", "turns", "history", "responses", "limits", "leases"} <= tables
    finally:
        await db.close()
    # opened again: nothing to do, the version stays
    again = await open_database(pg_dsn)
    try:
        async with again.connection(5) as con:
            assert await schema_version(con) == LATEST
            assert await con.fetchval("SELECT count(*) FROM chat_proxy.schema_version") == len(
                MIGRATIONS
            )
    finally:
        await again.close()


async def test_a_version_0_layout_is_upgraded_at_start_keeping_its_rows(
    pg_server: PostgresServer, pg_dsn: str
) -> None:
    pg_server.psql(V0_LAYOUT, database=pg_dsn.rsplit("/", 1)[1])
    store = await open_store(StoreConfig(backend="postgres", dsn=pg_dsn))
    try:
        assert isinstance(store, PostgresStore)
        async with store.db.connection(5) as con:
            assert await schema_version(con) == LATEST
        # the old rows, read through the upgraded schema
        assert await store.find_session("key-a", "d-old") == "sess_old"
        session = await store.get_session("key-a", "sess_old")
        assert session is not None and session.turn_count == 1 and session.total_tokens == 5
        assert session.turns == [{"messages": [{"role": "user", "content": "old ✓"}]}]
        # and what the old layout did not have
        await store.put_response(response())
        assert await store.get_response("key-a", "resp_1") == response()
        assert await store.delete_session("key-a", "sess_old") is True
        assert await store.get_response("key-a", "resp_1") is None
    finally:
        await store.close()


async def test_a_later_migration_upgrades_a_database_of_this_version(pg_dsn: str) -> None:
    """The upgrade path a future migration takes: from the current version, in order,
    the rows kept."""
    current = await open_database(pg_dsn)
    store = PostgresStore(current)
    await store.put_response(response())
    await store.close()
    later = Database(pg_dsn, migrations=(*MIGRATIONS, FUTURE))
    try:
        await later.prepare()
        async with later.connection(5) as con:
            assert await schema_version(con) == FUTURE.version
            assert await con.fetchval("SELECT to_regclass('chat_proxy.later')") is not None
        assert await PostgresStore(later).get_response("key-a", "resp_1") == response()
    finally:
        await later.close()


async def test_a_newer_schema_is_refused_with_a_clear_error(pg_dsn: str) -> None:
    later = Database(pg_dsn, migrations=(*MIGRATIONS, FUTURE))
    await later.prepare()
    await later.close()
    with pytest.raises(ConfigError) as caught:
        await open_store(StoreConfig(backend="postgres", dsn=pg_dsn))
    (line,) = caught.value.errors
    assert line.startswith("store.dsn: the database's chat_proxy schema is version 2, newer")
    assert "knows (up to 1)" in line


def test_serve_exits_2_on_a_newer_schema_and_on_a_missing_database(
    pg_server: PostgresServer, pg_dsn: str, tmp_path: Path
) -> None:
    async def make_newer() -> None:
        db = Database(pg_dsn, migrations=(*MIGRATIONS, FUTURE))
        await db.prepare()
        await db.close()

    asyncio.run(make_newer())
    for dsn, expected in (
        (pg_dsn, "newer than this chat-proxy knows"),
        (pg_server.dsn("no_such_database"), "InvalidCatalogNameError"),
    ):
        cfg = tmp_path / "proxy.yaml"
        cfg.write_text(
            f'upstreams: [{{name: echo, url: "echo:"}}]\nstore: {{backend: postgres, dsn: "{dsn}"}}\n'
        )
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "serve", "--config", str(cfg), "--port", "0"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert "cannot start:" in done.stderr
        assert expected in done.stderr


async def test_replicas_starting_together_migrate_once(pg_dsn: str) -> None:
    dbs = await asyncio.gather(*[open_database(pg_dsn) for _ in range(6)])
    try:
        rows = await dbs[0].fetch(5, "SELECT version FROM chat_proxy.schema_version")
        assert [r["version"] for r in rows] == [m.version for m in MIGRATIONS]
    finally:
        for db in dbs:
            await db.close()


async def test_migrate_is_one_transaction(pg_dsn: str) -> None:
    """A migration that fails leaves the schema as it was."""
    broken = Migration(LATEST + 1, "broken", "CREATE TABLE chat_proxy.half (x int); SELECT 1/0")
    con = await asyncpg.connect(pg_dsn)
    try:
        await migrate(con)
        with pytest.raises(asyncpg.DivisionByZeroError):
            await migrate(con, (*MIGRATIONS, broken))
        assert await schema_version(con) == LATEST
        assert await con.fetchval("SELECT to_regclass('chat_proxy.half')") is None
    finally:
        await con.close()
