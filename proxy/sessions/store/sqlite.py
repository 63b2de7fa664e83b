"""Sessions and stored responses in a SQLite file (the standard library's sqlite3).

The file is in WAL mode: readers never wait for the writer, and a process killed at
any moment leaves a consistent file (each batch of turns is one transaction, committed
as soon as the writer takes it). Each connection lives in its own thread: one for
writes, one for reads, so a slow write never holds up a continuation lookup. Several
worker processes may share one file; they take turns on its write lock.

The schema is created at open with CREATE ... IF NOT EXISTS, so a file made before a
table was added (`responses`) gains it the first time it is opened.

Why one module of over 400 lines: every statement of the SQLite store, its schema and
its two connections are read together when a query or the schema changes.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from proxy.sessions.store.base import (
    Page,
    Session,
    StoredResponse,
    TurnRecord,
    UnknownCursor,
    json_text,
)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    owner TEXT NOT NULL,
    id TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    source TEXT NOT NULL,
    key_id TEXT,
    model TEXT,
    turn_count INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (owner, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions (owner, updated, id);
CREATE INDEX IF NOT EXISTS sessions_by_age ON sessions (updated);
CREATE TABLE IF NOT EXISTS turns (
    owner TEXT NOT NULL,
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (owner, session_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history (
    owner TEXT NOT NULL,
    digest TEXT NOT NULL,
    session_id TEXT NOT NULL,
    PRIMARY KEY (owner, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS history_by_session ON history (owner, session_id);
CREATE TABLE IF NOT EXISTS responses (
    owner TEXT NOT NULL,
    id TEXT NOT NULL,
    created REAL NOT NULL,
    session_id TEXT,
    response TEXT NOT NULL,
    messages TEXT NOT NULL,
    PRIMARY KEY (owner, id)
);
CREATE INDEX IF NOT EXISTS responses_by_session ON responses (owner, session_id);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created);
"""
# (responses is a rowid table: its rows are large, which WITHOUT ROWID suits badly)

_COLUMNS = (
    "id, created, updated, source, key_id, model, turn_count, prompt_tokens, "
    "completion_tokens, total_tokens"
)


# one row per turn, in one executemany per batch: create the session or count the
# turn into it
_UPSERT_SESSION = (
    "INSERT INTO sessions (owner, id, created, updated, source, key_id, model, turn_count, "
    "prompt_tokens, completion_tokens, total_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?) "
    "ON CONFLICT (owner, id) DO UPDATE SET updated = max(updated, excluded.updated), "
    "source = excluded.source, model = coalesce(excluded.model, model), "
    "turn_count = turn_count + 1, "
    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = completion_tokens + excluded.completion_tokens, "
    "total_tokens = total_tokens + excluded.total_tokens"
)
# then the turns, once every session of the batch is counted: a turn's number is the
# session's count less the turns of that session later in the batch (?1); a number of
# 1 means this batch created the session, whose first turn is the opening one (?2)
_INSERT_TURN = (
    "INSERT OR REPLACE INTO turns (owner, session_id, seq, data) "
    "SELECT owner, id, turn_count - ?1, CASE WHEN turn_count - ?1 = 1 THEN ?2 ELSE ?3 END "
    "FROM sessions WHERE owner = ?4 AND id = ?5"
)
_INDEX_DIGEST = (
    "INSERT INTO history (owner, digest, session_id) VALUES (?, ?, ?) "
    "ON CONFLICT (owner, digest) DO UPDATE SET session_id = excluded.session_id"
)
_PUT_RESPONSE = (
    "INSERT INTO responses (owner, id, created, session_id, response, messages) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (owner, id) DO UPDATE SET "
    "created = excluded.created, session_id = excluded.session_id, "
    "response = excluded.response, messages = excluded.messages"
)
# json.dumps(value, ensure_ascii=False), without building an encoder per call
_encode = json.JSONEncoder(ensure_ascii=False).encode


def _dumps(value: Any) -> str:
    """The JSON text of a turn: orjson's where it writes the same value (compact, so the
    text differs in spacing only), the standard encoder's otherwise."""
    text = json_text(value)
    return text if text is not None else _encode(value)


def _session(row: Sequence[Any]) -> Session:
    return Session(*row)


def _connect(path: str) -> sqlite3.Connection:
    con = sqlite3.connect(path, timeout=10, isolation_level=None)
    con.execute("PRAGMA busy_timeout = 10000")
    con.execute("PRAGMA synchronous = NORMAL")
    con.execute("PRAGMA foreign_keys = OFF")
    return con


class SQLiteStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sqlite-read")
        self._wcon: sqlite3.Connection | None = None
        self._rcon: sqlite3.Connection | None = None
        self._closed = False

    @classmethod
    async def open(cls, path: str) -> SQLiteStore:
        store = cls(path)
        await store._write(store._init_writer)
        await store._read(store._init_reader)
        return store

    async def _write(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn)

    async def _read(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn)

    # -- set-up (in the connection's own thread) --

    def _init_writer(self) -> None:
        Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        con = _connect(self.path)
        mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"cannot put {self.path} in WAL mode (got {mode})")
        con.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                con.execute(statement)
        con.execute("COMMIT")
        self._wcon = con

    def _init_reader(self) -> None:
        self._rcon = _connect(self.path)

    # -- reads --

    async def find_session(self, owner: str, digest: str) -> str | None:
        def run() -> str | None:
            assert self._rcon is not None
            row = self._rcon.execute(
                "SELECT h.session_id FROM history h JOIN sessions s "
                "ON s.owner = h.owner AND s.id = h.session_id "
                "WHERE h.owner = ? AND h.digest = ?",
                (owner, digest),
            ).fetchone()
            return str(row[0]) if row else None

        return await self._read(run)

    async def get_session(self, owner: str, session_id: str) -> Session | None:
        def run() -> Session | None:
            con = self._rcon
            assert con is not None
            con.execute("BEGIN")
            try:
                row = con.execute(
                    f"SELECT {_COLUMNS} FROM sessions WHERE owner = ? AND id = ?",
                    (owner, session_id),
                ).fetchone()
                if row is None:
                    return None
                session = _session(row)
                session.turns = [
                    json.loads(data)
                    for (data,) in con.execute(
                        "SELECT data FROM turns WHERE owner = ? AND session_id = ? ORDER BY seq",
                        (owner, session_id),
                    )
                ]
                return session
            finally:
                con.execute("COMMIT")

        return await self._read(run)

    async def list_sessions(self, owner: str, limit: int, after: str | None = None) -> Page:
        def run() -> Page:
            con = self._rcon
            assert con is not None
            con.execute("BEGIN")
            try:
                if after is None:
                    rows = con.execute(
                        f"SELECT {_COLUMNS} FROM sessions WHERE owner = ? "
                        "ORDER BY updated DESC, id DESC LIMIT ?",
                        (owner, limit + 1),
                    ).fetchall()
                else:
                    cursor = con.execute(
                        "SELECT updated FROM sessions WHERE owner = ? AND id = ?", (owner, after)
                    ).fetchone()
                    if cursor is None:
                        raise UnknownCursor(after)
                    rows = con.execute(
                        f"SELECT {_COLUMNS} FROM sessions WHERE owner = ? "
                        "AND (updated < ? OR (updated = ? AND id < ?)) "
                        "ORDER BY updated DESC, id DESC LIMIT ?",
                        (owner, cursor[0], cursor[0], after, limit + 1),
                    ).fetchall()
            finally:
                con.execute("COMMIT")
            return Page([_session(r) for r in rows[:limit]], len(rows) > limit)

        return await self._read(run)

    async def get_response(self, owner: str, response_id: str) -> StoredResponse | None:
        def run() -> StoredResponse | None:
            assert self._rcon is not None
            row = self._rcon.execute(
                "SELECT created, session_id, response, messages FROM responses "
                "WHERE owner = ? AND id = ?",
                (owner, response_id),
            ).fetchone()
            if row is None:
                return None
            return StoredResponse(response_id, owner, float(row[0]), row[1], row[2], row[3])

        return await self._read(run)

    # -- writes --

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> Callable[[], T]:
        """`fn` on the writing connection in one immediate transaction."""

        def run() -> T:
            con = self._wcon
            assert con is not None
            con.execute("BEGIN IMMEDIATE")
            try:
                result = fn(con)
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:  # an I/O error may have rolled it back already
                    con.execute("ROLLBACK")
                raise
            return result

        return run

    async def put_response(self, record: StoredResponse) -> None:
        args = (
            record.owner,
            record.id,
            record.created,
            record.session_id,
            record.response,
            record.messages,
        )

        def run() -> None:
            assert self._wcon is not None
            # one statement: SQLite makes it atomic on its own
            self._wcon.execute(_PUT_RESPONSE, args)

        await self._write(run)

    async def delete_response(self, owner: str, response_id: str) -> bool:
        def run() -> bool:
            assert self._wcon is not None
            cur = self._wcon.execute(
                "DELETE FROM responses WHERE owner = ? AND id = ?", (owner, response_id)
            )
            return cur.rowcount > 0

        return await self._write(run)

    async def record_turns(self, records: Sequence[TurnRecord]) -> None:
        if not records:
            return
        # serialise here, not in the writer thread: the records are the caller's
        sessions: list[tuple[Any, ...]] = []
        turns: list[tuple[int, str, str, str, str]] = []
        history: list[tuple[str, str, str]] = []
        later: dict[tuple[str, str], int] = {}  # turns of a session further on
        for rec in reversed(records):
            owner, sid = rec.owner, rec.session_id
            turn = rec.text if rec.text is not None else _dumps(rec.turn)
            if rec.opening is None:
                first = turn
            else:
                first = rec.first_text if rec.first_text is not None else _dumps(rec.first_turn())
            after = later.get((owner, sid), 0)
            later[(owner, sid)] = after + 1
            turns.append((after, first, turn, owner, sid))
            sessions.append(
                (
                    owner,
                    sid,
                    rec.at,
                    rec.at,
                    rec.source,
                    rec.key_id,
                    rec.model,
                    rec.prompt_tokens,
                    rec.completion_tokens,
                    rec.total_tokens,
                )
            )
        sessions.reverse()
        turns.reverse()
        for rec in records:
            if rec.digests:
                owner, sid = rec.owner, rec.session_id
                history.extend((owner, d, sid) for d in rec.digests)

        def run() -> None:
            con = self._wcon
            assert con is not None
            con.execute("BEGIN IMMEDIATE")
            try:
                con.executemany(_UPSERT_SESSION, sessions)
                con.executemany(_INSERT_TURN, turns)
                if history:
                    con.executemany(_INDEX_DIGEST, history)
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:  # an I/O error may have rolled it back already
                    con.execute("ROLLBACK")
                raise

        await self._write(run)

    def _delete(self, con: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> int:
        """Delete the sessions selected by `where` (on sessions s) with their rows."""
        sub = f"SELECT s.owner, s.id FROM sessions s WHERE {where}"
        con.execute(f"DELETE FROM responses WHERE (owner, session_id) IN ({sub})", args)
        con.execute(f"DELETE FROM turns WHERE (owner, session_id) IN ({sub})", args)
        con.execute(f"DELETE FROM history WHERE (owner, session_id) IN ({sub})", args)
        return con.execute(f"DELETE FROM sessions WHERE (owner, id) IN ({sub})", args).rowcount

    async def delete_session(self, owner: str, session_id: str) -> bool:
        def run(con: sqlite3.Connection) -> bool:
            # the session's responses even when the session row is absent
            con.execute(
                "DELETE FROM responses WHERE owner = ? AND session_id = ?", (owner, session_id)
            )
            return self._delete(con, "s.owner = ? AND s.id = ?", (owner, session_id)) > 0

        return await self._write(self._transaction(run))

    async def purge(self, before: float) -> int:
        def run(con: sqlite3.Connection) -> int:
            n = self._delete(con, "s.updated < ?", (before,))
            con.execute("DELETE FROM responses WHERE created < ?", (before,))
            return n

        return await self._write(self._transaction(run))

    async def ping(self) -> bool:
        def run() -> bool:
            assert self._rcon is not None
            return bool(self._rcon.execute("SELECT 1").fetchone() == (1,))

        return await self._read(run)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def close_writer() -> None:
            if self._wcon is not None:
                try:
                    self._wcon.execute("PRAGMA wal_checkpoint(PASSIVE)")
                finally:
                    self._wcon.close()
                    self._wcon = None

        def close_reader() -> None:
            if self._rcon is not None:
                self._rcon.close()
                self._rcon = None

        try:
            await self._read(close_reader)
            await self._write(close_writer)
        finally:
            self._reader.shutdown(wait=False)
            self._writer.shutdown(wait=False)
