"""The PostgreSQL database of a proxy whose store is `postgres` (asyncpg): one bounded
connection pool per process, shared by the session store and the rate-limit counters,
and the schema, which the proxy creates and migrates itself.

Everything lives in the schema `chat_proxy` of the database that `store.dsn` names.
`chat_proxy.schema_version` has a row per applied migration; the highest is the
version of the schema. At start (and, when the server did not answer then, at the
first call that reaches it) the migrations above that version run in order, in one
transaction under an advisory lock, so replicas starting together migrate once. A
database of a newer version than this proxy knows is refused (SchemaTooNew): the
proxy exits 2 at start rather than write to tables whose meaning it does not know.

Every call has a timeout that covers waiting for a pooled connection as well as the
statement; SQL takes its values as parameters only.

Why one module of over 400 lines: the PostgreSQL schema, its versions and every
statement the store and the limiter send are read together when one of them changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg  # type: ignore[import-untyped]

log = logging.getLogger("chat_proxy")

POOL_SIZE = 10  # connections per process at most
CONNECT_TIMEOUT = 3.0  # seconds to open one connection
MIGRATE_TIMEOUT = 30.0  # seconds for the migrations (the lock wait included)
# an arbitrary constant: the advisory lock that serialises migrations in a database
_MIGRATION_LOCK = 0x63_68_61_74_70_72_78  # "chatprx"

# what a call raises when the server cannot be reached, refuses, or is too slow
ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)


# errors after which no pooled connection is worth using again
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.CannotConnectNowError,
    OSError,
)


# errors that say the database cannot serve now but will: the server gone, starting,
# full, failing over (a standby still read-only), a transaction that lost a deadlock,
# a schema being made again
_PASSING: tuple[type[BaseException], ...] = (
    *_CONNECTION_LOST,
    TimeoutError,
    asyncpg.TooManyConnectionsError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.QueryCanceledError,
    asyncpg.InvalidSchemaNameError,
    asyncpg.UndefinedTableError,
    asyncpg.UndefinedFunctionError,
)


def unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot serve now but will (a write is worth
    keeping and trying again), rather than that the call itself is wrong."""
    return isinstance(exc, _PASSING) and not isinstance(exc, asyncpg.ClientConfigurationError)


class SchemaTooNew(RuntimeError):
    """The database holds a schema of a later version than this proxy knows."""

    def __init__(self, found: int, known: int) -> None:
        super().__init__(
            f"the database's chat_proxy schema is version {found}, newer than this "
            f"chat-proxy knows (up to {known}): run a chat-proxy at least as new as the one "
            "that migrated it, or point store.dsn at another database"
        )
        self.found = found
        self.known = known


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    sql: str


# Migration 1: the whole schema. Written with IF NOT EXISTS throughout, so that it also
# upgrades the layout an unversioned database may hold (sessions, turns and history
# tables of an earlier shape, "version 0"), keeping their rows.
_V1 = """
CREATE TABLE IF NOT EXISTS chat_proxy.sessions (
    owner text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    created double precision NOT NULL,
    updated double precision NOT NULL,
    source text NOT NULL,
    key_id text,
    model text,
    turn_count bigint NOT NULL DEFAULT 0,
    prompt_tokens bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    total_tokens bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (owner, id)
);
-- the last turn number each writer recorded in the session: a batch retried after
-- its commit's answer was lost skips the turns it holds already
ALTER TABLE chat_proxy.sessions ADD COLUMN IF NOT EXISTS writers jsonb NOT NULL DEFAULT '{}';
CREATE INDEX IF NOT EXISTS sessions_by_owner ON chat_proxy.sessions (owner, updated, id);
CREATE INDEX IF NOT EXISTS sessions_by_age ON chat_proxy.sessions (updated);

CREATE TABLE IF NOT EXISTS chat_proxy.turns (
    owner text COLLATE "C" NOT NULL,
    session_id text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    data text NOT NULL,
    PRIMARY KEY (owner, session_id, seq)
);

CREATE TABLE IF NOT EXISTS chat_proxy.history (
    owner text COLLATE "C" NOT NULL,
    digest text COLLATE "C" NOT NULL,
    session_id text COLLATE "C" NOT NULL,
    PRIMARY KEY (owner, digest)
);
CREATE INDEX IF NOT EXISTS history_by_session ON chat_proxy.history (owner, session_id);

CREATE TABLE IF NOT EXISTS chat_proxy.responses (
    owner text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    created double precision NOT NULL,
    session_id text COLLATE "C",
    response text NOT NULL,
    messages text NOT NULL,
    PRIMARY KEY (owner, id)
);
CREATE INDEX IF NOT EXISTS responses_by_session ON chat_proxy.responses (owner, session_id);
CREATE INDEX IF NOT EXISTS responses_by_age ON chat_proxy.responses (created);

-- Append a batch of turns, one row per turn in each array (p_first: NULL where the
-- first turn is the turn itself; p_dfrom..p_dto: the turn's digests in p_digests).
-- Returns how many turns were appended (a turn its writer recorded already is not).
CREATE OR REPLACE FUNCTION chat_proxy.record_turns(
    p_owner text[], p_id text[], p_at double precision[], p_source text[],
    p_key_id text[], p_model text[], p_prompt bigint[], p_completion bigint[],
    p_total bigint[], p_turn text[], p_first text[], p_writer text[], p_seq bigint[],
    p_dfrom integer[], p_dto integer[], p_digests text[]
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
    written integer := 0;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_owner, 1), 0) LOOP
        INSERT INTO chat_proxy.sessions AS s (owner, id, created, updated, source, key_id,
            model, turn_count, prompt_tokens, completion_tokens, total_tokens, writers)
        VALUES (p_owner[i], p_id[i], p_at[i], p_at[i], p_source[i], p_key_id[i], p_model[i],
            1, p_prompt[i], p_completion[i], p_total[i],
            CASE WHEN p_writer[i] = '' THEN '{}'::jsonb
                 ELSE jsonb_build_object(p_writer[i], p_seq[i]) END)
        ON CONFLICT (owner, id) DO UPDATE SET
            updated = greatest(s.updated, excluded.updated),
            source = excluded.source,
            model = coalesce(excluded.model, s.model),
            turn_count = s.turn_count + 1,
            prompt_tokens = s.prompt_tokens + excluded.prompt_tokens,
            completion_tokens = s.completion_tokens + excluded.completion_tokens,
            total_tokens = s.total_tokens + excluded.total_tokens,
            writers = CASE WHEN p_writer[i] = '' THEN s.writers
                           ELSE s.writers || excluded.writers END
        WHERE p_writer[i] = ''
            OR coalesce((s.writers ->> p_writer[i])::bigint, 0) < p_seq[i]
        RETURNING s.turn_count INTO n;
        CONTINUE WHEN NOT FOUND;  -- this writer's turn is there already
        written := written + 1;
        INSERT INTO chat_proxy.turns (owner, session_id, seq, data)
        VALUES (p_owner[i], p_id[i], n,
            CASE WHEN n = 1 THEN coalesce(p_first[i], p_turn[i]) ELSE p_turn[i] END)
        ON CONFLICT (owner, session_id, seq) DO UPDATE SET data = excluded.data;
        IF p_dto[i] >= p_dfrom[i] THEN
            INSERT INTO chat_proxy.history AS h (owner, digest, session_id)
            SELECT DISTINCT p_owner[i], d, p_id[i] FROM unnest(p_digests[p_dfrom[i]:p_dto[i]]) AS d
            ON CONFLICT (owner, digest) DO UPDATE SET session_id = excluded.session_id;
        END IF;
    END LOOP;
    RETURN written;
END
$$;

-- rate-limit counters: a GCRA theoretical arrival time per key and kind (ms since the
-- epoch, by the server's clock), the key's count of requests in flight, and the
-- leases of those requests. UNLOGGED: no WAL, so a check costs no disk write; after a
-- crash of the server they start empty, as Redis counters do after a restart.
CREATE UNLOGGED TABLE IF NOT EXISTS chat_proxy.limits (
    key text COLLATE "C" PRIMARY KEY,
    requests_tat double precision NOT NULL DEFAULT 0,
    tokens_tat double precision NOT NULL DEFAULT 0,
    -- the leases of the key, counted as they are taken and given back; it may count
    -- leases that expired (a replica gone), which are recounted when they would refuse
    in_flight bigint NOT NULL DEFAULT 0
);
CREATE UNLOGGED TABLE IF NOT EXISTS chat_proxy.leases (
    key text COLLATE "C" NOT NULL,
    member text COLLATE "C" NOT NULL,
    expires double precision NOT NULL,
    PRIMARY KEY (key, member)
);

-- One check of every limit of a key at once: either all pass and all are counted, or
-- nothing is. The key's row is locked first, so checks of one key run one at a time
-- and the in-flight count is exact; the leases are read only when that count reaches
-- the limit (to drop the expired ones and count again), so a check touches no more
-- than its key's row and its own lease. Returns {allowed, concurrent ok, requests ok,
-- tokens ok, requests remaining, requests reset ms, tokens remaining, tokens reset
-- ms, retry ms, in flight}: the arithmetic of proxy/ratelimit/algorithm.py in ms.
CREATE OR REPLACE FUNCTION chat_proxy.acquire(
    p_key text, p_rpm bigint, p_tpm bigint, p_maxc bigint, p_cost bigint,
    p_member text, p_lease_ms double precision, p_period_ms double precision
) RETURNS double precision[] LANGUAGE plpgsql AS $$
DECLARE
    eps constant double precision := 1e-6;
    now_ms double precision;
    r_tat double precision;
    t_tat double precision;
    n_flight bigint;
    recounted boolean := false;
    iv double precision;
    base double precision;
    nxt double precision;
    retry double precision := 0;
    c_ok integer := 1;
    r_ok integer := 1;
    r_rem double precision := 0;
    r_reset double precision := 0;
    t_ok integer := 1;
    t_rem double precision := 0;
    t_reset double precision := 0;
BEGIN
    LOOP
        SELECT l.requests_tat, l.tokens_tat, l.in_flight INTO r_tat, t_tat, n_flight
        FROM chat_proxy.limits l WHERE l.key = p_key FOR UPDATE;
        EXIT WHEN FOUND;
        INSERT INTO chat_proxy.limits (key) VALUES (p_key) ON CONFLICT DO NOTHING;
    END LOOP;
    now_ms := extract(epoch FROM clock_timestamp()) * 1000;
    IF p_maxc > 0 AND n_flight >= p_maxc THEN
        DELETE FROM chat_proxy.leases WHERE key = p_key AND expires <= now_ms;
        SELECT count(*) INTO n_flight FROM chat_proxy.leases WHERE key = p_key;
        recounted := true;
        IF n_flight >= p_maxc THEN
            c_ok := 0;
            retry := 1000;
        END IF;
    END IF;
    IF p_rpm > 0 THEN
        iv := p_period_ms / p_rpm;
        base := greatest(r_tat, now_ms);
        nxt := base + iv;
        IF nxt - now_ms <= p_period_ms + eps THEN
            r_rem := greatest(0, floor((p_period_ms - (nxt - now_ms)) / iv + eps));
            r_reset := nxt - now_ms;
            r_tat := nxt;
        ELSE
            r_ok := 0;
            r_rem := greatest(0, floor((p_period_ms - (base - now_ms)) / iv + eps));
            r_reset := base - now_ms;
            retry := greatest(retry, nxt - now_ms - p_period_ms);
        END IF;
    END IF;
    IF p_tpm > 0 THEN
        iv := p_period_ms / p_tpm;
        base := greatest(t_tat, now_ms);
        nxt := base + p_cost * iv;
        IF nxt - now_ms <= p_period_ms + eps THEN
            t_rem := greatest(0, floor((p_period_ms - (nxt - now_ms)) / iv + eps));
            t_reset := nxt - now_ms;
            t_tat := nxt;
        ELSE
            t_ok := 0;
            t_rem := greatest(0, floor((p_period_ms - (base - now_ms)) / iv + eps));
            t_reset := base - now_ms;
            retry := greatest(retry, nxt - now_ms - p_period_ms);
        END IF;
    END IF;
    IF c_ok = 1 AND r_ok = 1 AND t_ok = 1 THEN
        IF p_maxc > 0 THEN
            INSERT INTO chat_proxy.leases (key, member, expires)
            VALUES (p_key, p_member, now_ms + p_lease_ms)
            ON CONFLICT (key, member) DO UPDATE SET expires = excluded.expires;
            n_flight := n_flight + 1;
        END IF;
        IF p_rpm > 0 OR p_tpm > 0 OR p_maxc > 0 THEN
            UPDATE chat_proxy.limits l
            SET requests_tat = r_tat, tokens_tat = t_tat, in_flight = n_flight
            WHERE l.key = p_key;
        END IF;
    ELSIF recounted THEN
        UPDATE chat_proxy.limits l SET in_flight = n_flight WHERE l.key = p_key;
    END IF;
    IF p_maxc = 0 THEN
        n_flight := 0;
    END IF;
    RETURN ARRAY[c_ok * r_ok * t_ok, c_ok, r_ok, t_ok, r_rem, ceil(r_reset), t_rem,
        ceil(t_reset), ceil(retry), n_flight]::double precision[];
END
$$;

-- The end of an admitted request: give back its lease ('' : none) and charge p_delta
-- more tokens (negative: a refund, which never leaves credit beyond a full bucket).
-- The key's row is locked before the lease, as acquire locks them: one order of
-- locks, so a settle and a check that recounts the leases never deadlock.
CREATE OR REPLACE FUNCTION chat_proxy.settle(
    p_key text, p_tpm bigint, p_delta bigint, p_member text, p_period_ms double precision
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    charge boolean := p_tpm > 0 AND p_delta <> 0;
    iv double precision := 0;
    gone integer := 0;
    now_ms double precision;
BEGIN
    IF p_member = '' AND NOT charge THEN
        RETURN;
    END IF;
    LOOP
        PERFORM 1 FROM chat_proxy.limits l WHERE l.key = p_key FOR UPDATE;
        EXIT WHEN FOUND;
        INSERT INTO chat_proxy.limits (key) VALUES (p_key) ON CONFLICT DO NOTHING;
    END LOOP;
    IF p_member <> '' THEN
        DELETE FROM chat_proxy.leases WHERE key = p_key AND member = p_member;
        IF FOUND THEN
            gone := 1;
        END IF;
    END IF;
    IF charge THEN
        iv := p_period_ms / p_tpm;
    END IF;
    now_ms := extract(epoch FROM clock_timestamp()) * 1000;
    UPDATE chat_proxy.limits l SET
        tokens_tat = CASE WHEN charge
            THEN greatest(greatest(l.tokens_tat, now_ms) + p_delta * iv, now_ms)
            ELSE l.tokens_tat END,
        in_flight = greatest(l.in_flight - gone, 0)
    WHERE l.key = p_key;
END
$$;
"""

MIGRATIONS: tuple[Migration, ...] = (Migration(1, "sessions, responses, rate limits", _V1),)


async def schema_version(con: Any) -> int:
    """The version of the chat_proxy schema in the database (0: none recorded)."""
    table = await con.fetchval("SELECT to_regclass('chat_proxy.schema_version')")
    if table is None:
        return 0
    version = await con.fetchval("SELECT coalesce(max(version), 0) FROM chat_proxy.schema_version")
    return int(version)


async def migrate(con: Any, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring the schema to the last of `migrations`; the version it was at. Raises
    SchemaTooNew for a database a later proxy migrated."""
    latest = migrations[-1].version if migrations else 0
    found = await schema_version(con)
    if found > latest:
        raise SchemaTooNew(found, latest)
    if found == latest:
        return found
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await con.execute("CREATE SCHEMA IF NOT EXISTS chat_proxy")
        await con.execute(
            "CREATE TABLE IF NOT EXISTS chat_proxy.schema_version ("
            "version integer PRIMARY KEY, description text NOT NULL, "
            "applied timestamptz NOT NULL DEFAULT now())"
        )
        found = await schema_version(con)  # another process may have migrated meanwhile
        if found > latest:
            raise SchemaTooNew(found, latest)
        for step in migrations:
            if step.version <= found:
                continue
            await con.execute(step.sql)
            await con.execute(
                "INSERT INTO chat_proxy.schema_version (version, description) VALUES ($1, $2)",
                step.version,
                step.description,
            )
            log.info(
                "store schema migrated",
                extra={"from_version": found, "to_version": step.version},
            )
    return found


async def _keep_session(con: Any) -> None:
    """What a connection's release does beyond rolling back a transaction left open
    (asyncpg always does that): nothing. The proxy sets no session state (no SET, no
    LISTEN, no cursor, no session-level advisory lock), so asyncpg's default reset
    (RESET ALL, UNLISTEN *, CLOSE ALL, pg_advisory_unlock_all()) would only cost a
    round trip per call."""


class Database:
    """The pool and the schema of one process. Nothing connects until `prepare` or a
    first call; a call made before the schema is known to be current migrates first."""

    def __init__(
        self, dsn: str, *, max_size: int = POOL_SIZE, migrations: Sequence[Migration] = MIGRATIONS
    ) -> None:
        self.dsn = dsn
        self.migrations = tuple(migrations)
        self._pool: Any = None
        self._max_size = max_size
        self._ready = False
        self._lock = asyncio.Lock()
        self._closed = False

    def _get_pool(self) -> Any:
        if self._pool is None:
            self._pool = asyncpg.create_pool(
                self.dsn,
                init_size=0,
                min_size=0,
                max_size=self._max_size,
                timeout=CONNECT_TIMEOUT,
                # idle connections close after a minute; a restarted server's dead
                # ones are dropped at their first use
                max_inactive_connection_lifetime=60.0,
                server_settings={"application_name": "chat-proxy"},
                reset=_keep_session,
            )
        return self._pool

    async def _pool_ready(self) -> Any:
        pool = self._get_pool()
        await pool  # creates the holders only (init_size 0): no connection yet
        return pool

    async def prepare(self) -> None:
        """Connect once and migrate the schema if it is behind."""
        if self._ready:
            return
        async with self._lock:
            if self._ready:
                return
            pool = await self._pool_ready()
            async with pool.acquire(timeout=CONNECT_TIMEOUT) as con:
                await migrate(con, self.migrations)
            self._ready = True

    @asynccontextmanager
    async def connection(self, timeout: float) -> AsyncIterator[Any]:
        """A pooled connection for one unit of work, all of it within `timeout`
        seconds (the wait for a free connection, a migration the schema still needs,
        the statements)."""
        if self._closed:
            raise asyncpg.InterfaceError("the store is closed")
        try:
            async with asyncio.timeout(timeout):
                if not self._ready:
                    await self.prepare()
                async with self._pool.acquire() as con:
                    yield con
        except (
            asyncpg.InvalidSchemaNameError,
            asyncpg.UndefinedTableError,
            asyncpg.UndefinedFunctionError,
        ):
            # the database was replaced under the proxy (restored empty): migrate again
            self._ready = False
            raise
        except _CONNECTION_LOST:
            # the server went away: the pooled connections it had are as good as gone
            if self._pool is not None:
                await self._pool.expire_connections()
            raise

    async def fetch(self, timeout: float, query: str, *args: Any) -> list[Any]:
        async with self.connection(timeout) as con:
            rows: list[Any] = await con.fetch(query, *args)
            return rows

    async def fetchrow(self, timeout: float, query: str, *args: Any) -> Any:
        async with self.connection(timeout) as con:
            return await con.fetchrow(query, *args)

    async def fetchval(self, timeout: float, query: str, *args: Any) -> Any:
        async with self.connection(timeout) as con:
            return await con.fetchval(query, *args)

    async def execute(self, timeout: float, query: str, *args: Any) -> str:
        async with self.connection(timeout) as con:
            status: str = await con.execute(query, *args)
            return status

    async def ping(self, timeout: float = 2.0) -> bool:
        return bool(await self.fetchval(timeout, "SELECT 1") == 1)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 5)
            except ERRORS:
                self._pool.terminate()


async def open_database(dsn: str, *, what: str = "store.dsn") -> Database:
    """The database of `store.dsn`, its schema migrated. A server that does not answer
    yet is not an error here (the proxy starts, and its store is down until the
    server answers); a refusal that will not pass by itself is, and so is a schema
    newer than this proxy's: both raise ConfigError, which stops the start with exit 2."""
    from proxy.config import ConfigError

    db = Database(dsn)
    try:
        await asyncio.wait_for(db.prepare(), MIGRATE_TIMEOUT)
    except SchemaTooNew as exc:
        await db.close()
        raise ConfigError([f"{what}: {exc}"]) from None
    except Exception as exc:
        if not unavailable(exc):
            await db.close()
            raise ConfigError(
                [f"{what}: cannot use the PostgreSQL database ({type(exc).__name__}: {exc})"]
            ) from None
        log.warning("the PostgreSQL store does not answer yet: %s: %s", type(exc).__name__, exc)
    return db
