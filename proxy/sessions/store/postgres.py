"""Sessions and stored responses in PostgreSQL, shared by every replica and worker
(asyncpg; the schema and the pool are proxy/pgstore.py's).

A batch of turns is one call of the function `chat_proxy.record_turns`: one round trip
and one transaction, so a batch is in whole or not at all. Each turn counts itself into
its session's row (an upsert, which locks the row) and takes the number it leaves, so
replicas writing to one session concurrently never lose a turn or a token. The turns
of a batch go in session order, so two batches lock their sessions in the same order
and never deadlock. A batch whose commit was acknowledged to nobody (the connection
dropped) is retried by the writer; the session row keeps the last turn number of each
writer, and a turn it holds already is skipped.

Deleting a session (its turns, index entries and responses with it) and the
retention purge are one statement each.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from proxy.pgstore import Database, unavailable
from proxy.sessions.store.base import (
    Page,
    Session,
    StoredResponse,
    TurnRecord,
    UnknownCursor,
    json_text,
)

READ_TIMEOUT = 5.0  # seconds: a lookup on the request path, a Sessions API read
WRITE_TIMEOUT = 10.0  # seconds: a batch of turns, a deletion, a purge

_COLUMNS = (
    "id, created, updated, source, key_id, model, turn_count, prompt_tokens, "
    "completion_tokens, total_tokens"
)

_RECORD = (
    "SELECT chat_proxy.record_turns($1::text[], $2::text[], $3::float8[], $4::text[], "
    "$5::text[], $6::text[], $7::int8[], $8::int8[], $9::int8[], $10::text[], $11::text[], "
    "$12::text[], $13::int8[], $14::int4[], $15::int4[], $16::text[])"
)

_FIND = (
    "SELECT h.session_id FROM chat_proxy.history h JOIN chat_proxy.sessions s "
    "ON s.owner = h.owner AND s.id = h.session_id WHERE h.owner = $1 AND h.digest = $2"
)

_GET = (
    f"SELECT {_COLUMNS}, ARRAY(SELECT t.data FROM chat_proxy.turns t "
    "WHERE t.owner = s.owner AND t.session_id = s.id ORDER BY t.seq) AS turns "
    "FROM chat_proxy.sessions s WHERE s.owner = $1 AND s.id = $2"
)

# the page after a cursor in one statement (one snapshot): no row if the cursor is not
# one of the owner's sessions, one row of NULLs if nothing follows it
_LIST_AFTER = (
    "WITH c AS (SELECT updated, id FROM chat_proxy.sessions WHERE owner = $1 AND id = $2) "
    f"SELECT page.* FROM c LEFT JOIN LATERAL (SELECT {_COLUMNS} FROM chat_proxy.sessions s "
    "WHERE s.owner = $1 AND (s.updated, s.id) < (c.updated, c.id) "
    "ORDER BY s.updated DESC, s.id DESC LIMIT $3) page ON true"
)
_LIST = (
    f"SELECT {_COLUMNS} FROM chat_proxy.sessions WHERE owner = $1 "
    "ORDER BY updated DESC, id DESC LIMIT $2"
)

# a session, its turns, its index entries and the owner's responses of that session
# (these even when the session row is absent); true if the session was there
_DELETE = (
    "WITH r AS (DELETE FROM chat_proxy.responses WHERE owner = $1 AND session_id = $2), "
    "t AS (DELETE FROM chat_proxy.turns WHERE owner = $1 AND session_id = $2), "
    "h AS (DELETE FROM chat_proxy.history WHERE owner = $1 AND session_id = $2), "
    "s AS (DELETE FROM chat_proxy.sessions WHERE owner = $1 AND id = $2 RETURNING 1) "
    "SELECT count(*) FROM s"
)

# every session not updated since $1 with its rows, and every response created before
_PURGE = (
    "WITH old AS (DELETE FROM chat_proxy.sessions WHERE updated < $1 RETURNING owner, id), "
    "t AS (DELETE FROM chat_proxy.turns x USING old "
    "WHERE x.owner = old.owner AND x.session_id = old.id), "
    "h AS (DELETE FROM chat_proxy.history x USING old "
    "WHERE x.owner = old.owner AND x.session_id = old.id), "
    "r AS (DELETE FROM chat_proxy.responses x WHERE x.created < $1 OR EXISTS "
    "(SELECT 1 FROM old WHERE old.owner = x.owner AND old.id = x.session_id)) "
    "SELECT count(*) FROM old"
)

_PUT_RESPONSE = (
    "INSERT INTO chat_proxy.responses (owner, id, created, session_id, response, messages) "
    "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (owner, id) DO UPDATE SET "
    "created = excluded.created, session_id = excluded.session_id, "
    "response = excluded.response, messages = excluded.messages"
)
_GET_RESPONSE = (
    "SELECT created, session_id, response, messages FROM chat_proxy.responses "
    "WHERE owner = $1 AND id = $2"
)
_DELETE_RESPONSE = "DELETE FROM chat_proxy.responses WHERE owner = $1 AND id = $2"


def _dumps(value: Any) -> str:
    """The JSON text of a turn: orjson's where it writes the same value, else the
    standard encoder's with ASCII escapes (text PostgreSQL always takes: no lone
    surrogate reaches it raw)."""
    text = json_text(value)
    return text if text is not None else json.dumps(value)


def _session(row: Any) -> Session:
    return Session(
        id=row["id"],
        created=row["created"],
        updated=row["updated"],
        source=row["source"],
        key_id=row["key_id"],
        model=row["model"],
        turn_count=row["turn_count"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        total_tokens=row["total_tokens"],
    )


class PostgresStore:
    def __init__(self, db: Database) -> None:
        """On the process's database (pool and schema), which the store closes."""
        self.db = db

    def unavailable(self, exc: BaseException) -> bool:
        """Whether `exc` says the database cannot take writes now but will (the writer
        keeps the turns and tries again) rather than that this write is wrong."""
        return unavailable(exc)

    async def find_session(self, owner: str, digest: str) -> str | None:
        found = await self.db.fetchval(READ_TIMEOUT, _FIND, owner, digest)
        return str(found) if found is not None else None

    async def record_turns(self, records: Sequence[TurnRecord]) -> None:
        if not records:
            return
        # in session order (stable: a session's turns keep theirs), so that batches
        # lock the rows of their sessions in one order
        ordered = sorted(records, key=lambda r: (r.owner, r.session_id))
        cols: list[list[Any]] = [[] for _ in range(13)]
        dfrom: list[int] = []
        dto: list[int] = []
        digests: list[str] = []
        for rec in ordered:
            turn = rec.text if rec.text is not None else _dumps(rec.turn)
            if rec.opening is None:
                first = None
            elif rec.first_text is not None:
                first = rec.first_text
            else:
                first = _dumps(rec.first_turn())
            values = (
                rec.owner,
                rec.session_id,
                float(rec.at),
                rec.source,
                rec.key_id,
                rec.model,
                rec.prompt_tokens,
                rec.completion_tokens,
                rec.total_tokens,
                turn,
                first,
                rec.writer,
                rec.seq,
            )
            for col, value in zip(cols, values, strict=True):
                col.append(value)
            dfrom.append(len(digests) + 1)
            digests.extend(rec.digests)
            dto.append(len(digests))
        await self.db.fetchval(WRITE_TIMEOUT, _RECORD, *cols, dfrom, dto, digests)

    async def get_session(self, owner: str, session_id: str) -> Session | None:
        row = await self.db.fetchrow(READ_TIMEOUT, _GET, owner, session_id)
        if row is None:
            return None
        session = _session(row)
        session.turns = [json.loads(t) for t in row["turns"]]
        return session

    async def list_sessions(self, owner: str, limit: int, after: str | None = None) -> Page:
        if after is None:
            rows = await self.db.fetch(READ_TIMEOUT, _LIST, owner, limit + 1)
        else:
            rows = await self.db.fetch(READ_TIMEOUT, _LIST_AFTER, owner, after, limit + 1)
            if not rows:
                raise UnknownCursor(after)
            rows = [r for r in rows if r["id"] is not None]
        return Page([_session(r) for r in rows[:limit]], len(rows) > limit)

    async def delete_session(self, owner: str, session_id: str) -> bool:
        deleted = await self.db.fetchval(WRITE_TIMEOUT, _DELETE, owner, session_id)
        return bool(deleted)

    async def purge(self, before: float) -> int:
        return int(await self.db.fetchval(WRITE_TIMEOUT, _PURGE, float(before)))

    # -- stored responses --

    async def put_response(self, record: StoredResponse) -> None:
        await self.db.execute(
            WRITE_TIMEOUT,
            _PUT_RESPONSE,
            record.owner,
            record.id,
            float(record.created),
            record.session_id,
            record.response,
            record.messages,
        )

    async def get_response(self, owner: str, response_id: str) -> StoredResponse | None:
        row = await self.db.fetchrow(READ_TIMEOUT, _GET_RESPONSE, owner, response_id)
        if row is None:
            return None
        return StoredResponse(
            id=response_id,
            owner=owner,
            created=float(row["created"]),
            session_id=row["session_id"],
            response=row["response"],
            messages=row["messages"],
        )

    async def delete_response(self, owner: str, response_id: str) -> bool:
        status = await self.db.execute(WRITE_TIMEOUT, _DELETE_RESPONSE, owner, response_id)
        return status != "DELETE 0"

    async def ping(self) -> bool:
        return await self.db.ping()

    async def close(self) -> None:
        await self.db.close()
