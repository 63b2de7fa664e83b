"""One suite for every session store: memory, SQLite (a temporary file), Redis
(127.0.0.1:6379, a fresh key prefix per test, removed afterwards) and PostgreSQL (a
fresh database on a server the tests start, tests/postgres/server.py): the contract
the session middleware, the Sessions API and the Responses API's stored responses
rely on."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy.config import StoreConfig
from proxy.sessions.store import (
    MemoryStore,
    SessionStore,
    StoredResponse,
    TurnRecord,
    UnknownCursor,
    open_store,
)
from proxy.sessions.store.sqlite import SQLiteStore
from tests.postgres import server as postgres

Opener = Callable[[], Awaitable[SessionStore]]
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(params=["memory", "sqlite", "redis", "redis-sentinel", "redis-cluster", "postgres"])
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens the store under test; a second call opens another instance on the same
    data (another process, replica or restart), except for memory (the same one).
    redis-sentinel, redis-cluster: deployments of their own (tests/redis_ha)."""
    backend: str = request.param
    ha = request.getfixturevalue(backend.replace("-", "_")) if backend[:6] == "redis-" else None
    prefix = f"chat-proxy-test:{uuid.uuid4().hex}:"
    opened: list[SessionStore] = []
    # postgres: a fresh database on the tests' own server
    dsn = postgres.shared().new_database() if backend == "postgres" else None

    async def open_() -> SessionStore:
        if backend == "memory" and opened:
            return opened[0]
        cfg = (
            StoreConfig(**ha.store_config(prefix))
            if ha is not None
            else StoreConfig(
                backend=backend, path=str(tmp_path / "sessions.db"), url=REDIS_URL, prefix=prefix
            )  # type: ignore[arg-type]
        )
        if dsn is not None:
            cfg = cfg.model_copy(update={"dsn": dsn})
        store = await open_store(cfg)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        await store.close()
    if backend == "redis":
        r = aioredis.from_url(REDIS_URL)
        keys = [k async for k in r.scan_iter(match=prefix + "*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()


@pytest.fixture
async def store(opener: Opener) -> SessionStore:
    return await opener()


def turn_record(
    owner: str = "key-a",
    sid: str = "sess_1",
    at: float = 1_700_000_000.0,
    *,
    text: str = "hello",
    source: str = "new",
    usage: tuple[int, int, int] = (3, 2, 5),
    digests: tuple[str, ...] = (),
    opening: list[Any] | None = None,
    model: str | None = "m1",
) -> TurnRecord:
    return TurnRecord(
        owner=owner,
        session_id=sid,
        at=at,
        source=source,
        key_id=owner,
        model=model,
        turn={
            "created": int(at),
            "messages": [{"role": "user", "content": text}],
            "response": {"role": "assistant", "content": f"re: {text}", "tool_calls": None},
            "finish_reason": "stop",
            "model": model,
            "usage": {
                "prompt_tokens": usage[0],
                "completion_tokens": usage[1],
                "total_tokens": usage[2],
            },
            "latency_ms": 12,
        },
        opening=opening,
        prompt_tokens=usage[0],
        completion_tokens=usage[1],
        total_tokens=usage[2],
        digests=digests,
        digest_ttl=3600,
    )


async def test_a_turn_creates_the_session_and_the_next_appends(store: SessionStore) -> None:
    opening = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"}]
    await store.record_turns([turn_record(text="first", opening=opening, source="header")])
    await store.record_turns(
        [
            turn_record(
                at=1_700_000_060.5,
                text="second ✓ ünïcode",
                opening=opening,
                source="continued",
                model="m2",
            )
        ]
    )
    session = await store.get_session("key-a", "sess_1")
    assert session is not None
    assert session.id == "sess_1"
    assert session.created == 1_700_000_000.0
    assert session.updated == 1_700_000_060.5
    assert session.source == "continued"
    assert session.key_id == "key-a"
    assert session.model == "m2"
    assert (
        session.turn_count,
        session.prompt_tokens,
        session.completion_tokens,
        session.total_tokens,
    ) == (2, 6, 4, 10)
    assert session.turns is not None
    # the opening messages replace the first turn's only
    assert [t["messages"] for t in session.turns] == [
        opening,
        [{"role": "user", "content": "second ✓ ünïcode"}],
    ]
    assert session.turns[1]["response"]["content"] == "re: second ✓ ünïcode"
    assert session.turns[1]["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
    }


async def test_an_unknown_session_is_none(store: SessionStore) -> None:
    assert await store.get_session("key-a", "sess_nope") is None
    assert await store.delete_session("key-a", "sess_nope") is False


async def test_find_by_digest_sees_only_the_owners_existing_sessions(store: SessionStore) -> None:
    await store.record_turns([turn_record(digests=("d1", "d2"))])
    assert await store.find_session("key-a", "d1") == "sess_1"
    assert await store.find_session("key-a", "d2") == "sess_1"
    assert await store.find_session("key-b", "d1") is None
    assert await store.find_session("key-a", "d3") is None
    # a digest points to the session that recorded it last
    await store.record_turns([turn_record(sid="sess_2", at=1_700_000_100.0, digests=("d2",))])
    assert await store.find_session("key-a", "d2") == "sess_2"
    assert await store.find_session("key-a", "d1") == "sess_1"
    # a deleted session is found no more, and its digests do not reach the other one
    assert await store.delete_session("key-a", "sess_1") is True
    assert await store.find_session("key-a", "d1") is None
    assert await store.find_session("key-a", "d2") == "sess_2"


async def test_one_id_under_two_owners_is_two_sessions(store: SessionStore) -> None:
    await store.record_turns(
        [
            turn_record(owner="key-a", sid="conv-1", text="from a"),
            turn_record(owner="key-b", sid="conv-1", text="from b", usage=(10, 10, 20)),
            turn_record(owner="key-b", sid="conv-1", text="again b", usage=(10, 10, 20)),
        ]
    )
    a = await store.get_session("key-a", "conv-1")
    b = await store.get_session("key-b", "conv-1")
    assert a is not None and b is not None
    assert (a.turn_count, a.total_tokens) == (1, 5)
    assert (b.turn_count, b.total_tokens) == (2, 40)
    assert a.turns is not None and [t["messages"][0]["content"] for t in a.turns] == ["from a"]
    assert await store.delete_session("key-c", "conv-1") is False
    assert await store.delete_session("key-a", "conv-1") is True
    assert await store.get_session("key-a", "conv-1") is None
    assert await store.get_session("key-b", "conv-1") is not None
    assert [s.id for s in (await store.list_sessions("key-b", 10)).data] == ["conv-1"]


async def test_list_is_newest_first_and_pages_with_after(store: SessionStore) -> None:
    times = {"s-a": 10.0, "s-b": 30.0, "s-c": 20.0, "s-d": 30.0, "s-e": 40.5, "s-f": 5.0}
    await store.record_turns(
        [turn_record(sid=sid, at=1_700_000_000 + t) for sid, t in times.items()]
    )
    await store.record_turns([turn_record(owner="key-b", sid="other", at=1_800_000_000.0)])
    expected = ["s-e", "s-d", "s-b", "s-c", "s-a", "s-f"]  # ties: the higher id first
    first = await store.list_sessions("key-a", 20)
    assert [s.id for s in first.data] == expected
    assert first.has_more is False
    assert first.data[0].turns is None
    assert first.data[0].total_tokens == 5

    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        page = await store.list_sessions("key-a", 4 if pages == 0 else 1, after)
        pages += 1
        seen.extend(s.id for s in page.data)
        if not page.has_more:
            break
        after = page.data[-1].id
        assert pages < 10
    assert seen == expected
    assert pages == 3  # 4 + 1 + 1, the last one saying there is no more

    exact = await store.list_sessions("key-a", 6)
    assert exact.has_more is False and len(exact.data) == 6
    assert (await store.list_sessions("key-a", 5)).has_more is True
    assert (await store.list_sessions("key-a", 3, "s-f")).data == []
    with pytest.raises(UnknownCursor):
        await store.list_sessions("key-a", 3, "nope")
    with pytest.raises(UnknownCursor):
        await store.list_sessions("key-a", 3, "other")  # key-b's
    assert (await store.list_sessions("key-c", 3)).data == []


async def test_purge_removes_sessions_not_updated_since(store: SessionStore) -> None:
    await store.record_turns(
        [
            turn_record(sid="old", at=1000.0, digests=("d-old",)),
            turn_record(owner="key-b", sid="old-b", at=1500.0),
            turn_record(sid="kept", at=1000.0),
            turn_record(sid="kept", at=3000.0, digests=("d-kept",)),
            turn_record(sid="new", at=2000.0),
        ]
    )
    assert await store.purge(2000.0) == 2
    assert await store.get_session("key-a", "old") is None
    assert await store.get_session("key-b", "old-b") is None
    assert await store.find_session("key-a", "d-old") is None
    assert await store.find_session("key-a", "d-kept") == "kept"
    kept = await store.get_session("key-a", "kept")
    assert kept is not None and kept.turn_count == 2
    assert [s.id for s in (await store.list_sessions("key-a", 10)).data] == ["kept", "new"]
    assert await store.purge(2000.0) == 0


async def test_concurrent_writers_lose_no_turn(opener: Opener) -> None:
    """Two writers (processes, replicas) append to one session at the same time."""
    one, two = await opener(), await opener()

    async def write(store: SessionStore, who: str) -> None:
        for i in range(25):
            await store.record_turns(
                [turn_record(sid="shared", at=1_700_000_000 + i, text=f"{who}{i}", usage=(1, 2, 3))]
            )

    await asyncio.gather(write(one, "x"), write(two, "y"))
    session = await one.get_session("key-a", "shared")
    assert session is not None
    assert (
        session.turn_count,
        session.prompt_tokens,
        session.completion_tokens,
        session.total_tokens,
    ) == (
        50,
        50,
        100,
        150,
    )
    assert session.turns is not None
    texts = sorted(t["messages"][0]["content"] for t in session.turns)
    assert texts == sorted([f"x{i}" for i in range(25)] + [f"y{i}" for i in range(25)])


async def test_another_instance_sees_the_sessions(
    opener: Opener, request: pytest.FixtureRequest
) -> None:
    first = await opener()
    if isinstance(first, MemoryStore):
        pytest.skip("a memory store is private to its process")
    await first.record_turns([turn_record(digests=("d1",))])
    await first.close()
    second = await opener()
    assert await second.find_session("key-a", "d1") == "sess_1"
    session = await second.get_session("key-a", "sess_1")
    assert session is not None and session.turn_count == 1
    assert await second.ping() is True


# -- stored responses --


def stored(
    rid: str = "resp_1",
    owner: str = "key-a",
    created: float = 1_700_000_000.0,
    session_id: str | None = "sess_1",
    *,
    text: str = "hello",
) -> StoredResponse:
    response = {
        "id": rid,
        "object": "response",
        "created_at": int(created),
        "status": "completed",
        "output": [
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": f"re: {text}", "annotations": []}],
            }
        ],
    }
    messages = [
        {"role": "user", "content": text},
        {"role": "assistant", "content": f"re: {text}"},
    ]
    return StoredResponse(
        id=rid,
        owner=owner,
        created=created,
        session_id=session_id,
        response=json.dumps(response, ensure_ascii=False),
        messages=json.dumps(messages, ensure_ascii=False),
    )


async def test_a_response_reads_back_character_for_character(store: SessionStore) -> None:
    # spacing, key order, escapes and raw non-ASCII exactly as the caller wrote them
    response = (
        '{"id": "resp_ü1",  "output":[{"type":"message","content":[{"type":"output_text",'
        '"text":"naïve ✓ 日本語 🦜 \\u2028 \\ud83e\\udd9c \\"q\\" \\\\ tab\\t"}]}],'
        '"z":1, "a":1.50, "metadata":{}}'
    )
    messages = (
        '[{"role":"user","content":"héllo 🦜\\n"} ,\n {"role":"assistant","content":"ça va"}]'
    )
    record = StoredResponse(
        id="resp_ü1",
        owner="key-ü",
        created=1_700_000_000.123456,
        session_id="sess_✓",
        response=response,
        messages=messages,
    )
    await store.put_response(record)
    got = await store.get_response("key-ü", "resp_ü1")
    assert got == record
    assert got is not None and got.response == response and got.messages == messages
    assert json.loads(got.response)["output"][0]["content"][0]["text"].endswith("tab\t")

    alone = StoredResponse("resp_2", "key-a", 1.5, None, '{"id":"resp_2"}', "[]")
    await store.put_response(alone)
    assert await store.get_response("key-a", "resp_2") == alone


async def test_another_owners_response_is_not_found(store: SessionStore) -> None:
    await store.put_response(stored(owner="key-a", text="a's"))
    assert await store.get_response("key-b", "resp_1") is None
    assert await store.delete_response("key-b", "resp_1") is False
    assert await store.get_response("key-a", "resp_1") == stored(owner="key-a", text="a's")
    # the same id under two owners is two responses
    await store.put_response(stored(owner="key-b", text="b's"))
    assert await store.get_response("key-a", "resp_1") == stored(owner="key-a", text="a's")
    assert await store.get_response("key-b", "resp_1") == stored(owner="key-b", text="b's")
    assert await store.delete_response("key-b", "resp_1") is True
    assert await store.get_response("key-a", "resp_1") is not None


async def test_delete_a_response_once(store: SessionStore) -> None:
    await store.record_turns([turn_record()])
    await store.put_response(stored())
    await store.put_response(stored("resp_2"))
    assert await store.get_response("key-a", "resp_nope") is None
    assert await store.delete_response("key-a", "resp_nope") is False
    assert await store.delete_response("key-a", "resp_1") is True
    assert await store.delete_response("key-a", "resp_1") is False
    assert await store.get_response("key-a", "resp_1") is None
    # the response alone: its session and the session's other responses stay
    assert await store.get_session("key-a", "sess_1") is not None
    assert await store.get_response("key-a", "resp_2") == stored("resp_2")


async def test_a_response_put_again_is_replaced(store: SessionStore) -> None:
    await store.put_response(stored(text="first"))
    again = stored(created=1_700_000_100.0, session_id="sess_2", text="second")
    await store.put_response(again)
    assert await store.get_response("key-a", "resp_1") == again
    # it left its first session: deleting that one keeps it
    await store.delete_session("key-a", "sess_1")
    assert await store.get_response("key-a", "resp_1") == again
    await store.delete_session("key-a", "sess_2")
    assert await store.get_response("key-a", "resp_1") is None
    # and without a session: no session deletion reaches it
    await store.put_response(stored(session_id="sess_3"))
    await store.put_response(stored(session_id=None))
    await store.delete_session("key-a", "sess_3")
    assert await store.get_response("key-a", "resp_1") == stored(session_id=None)


async def test_deleting_a_session_deletes_its_responses(store: SessionStore) -> None:
    await store.record_turns(
        [
            turn_record(sid="sess_1"),
            turn_record(sid="sess_2"),
            turn_record(owner="key-b", sid="sess_1"),
        ]
    )
    await store.put_response(stored("resp_1", session_id="sess_1"))
    await store.put_response(stored("resp_2", session_id="sess_1"))
    await store.put_response(stored("resp_3", session_id="sess_2"))
    await store.put_response(stored("resp_4", session_id=None))
    await store.put_response(stored("resp_5", owner="key-b", session_id="sess_1"))
    assert await store.delete_session("key-a", "sess_1") is True
    assert await store.get_response("key-a", "resp_1") is None
    assert await store.get_response("key-a", "resp_2") is None
    assert await store.get_response("key-a", "resp_3") == stored("resp_3", session_id="sess_2")
    assert await store.get_response("key-a", "resp_4") == stored("resp_4", session_id=None)
    assert await store.get_response("key-b", "resp_5") is not None  # another owner's session
    # responses of a session the store has no row for (its turn not written yet) go too,
    # and the answer is still that there was no such session
    await store.put_response(stored("resp_6", session_id="sess_unwritten"))
    assert await store.delete_session("key-a", "sess_unwritten") is False
    assert await store.get_response("key-a", "resp_6") is None


async def test_purge_removes_old_responses_and_keeps_new_ones(store: SessionStore) -> None:
    await store.record_turns(
        [turn_record(sid="old", at=1000.0), turn_record(sid="kept", at=3000.0)]
    )
    await store.put_response(stored("resp_old", created=1000.0, session_id="kept"))
    await store.put_response(stored("resp_old_b", owner="key-b", created=1999.5, session_id=None))
    await store.put_response(stored("resp_edge", created=2000.0, session_id="kept"))
    await store.put_response(stored("resp_new", created=3000.0, session_id="kept"))
    await store.put_response(stored("resp_alone", created=2500.0, session_id=None))
    # a purged session takes its responses with it, however recent
    await store.put_response(stored("resp_in_old", created=2500.0, session_id="old"))
    assert await store.purge(2000.0) == 1  # sessions
    assert await store.get_response("key-a", "resp_old") is None
    assert await store.get_response("key-b", "resp_old_b") is None
    assert await store.get_response("key-a", "resp_in_old") is None
    for rid in ("resp_edge", "resp_new", "resp_alone"):
        got = await store.get_response("key-a", rid)
        assert got is not None and got.id == rid
    assert await store.purge(2000.0) == 0
    assert await store.get_response("key-a", "resp_edge") is not None
    # the purged ones are gone from every index: deleting their session is harmless
    assert await store.delete_session("key-a", "kept") is True
    assert await store.get_response("key-a", "resp_new") is None
    assert await store.get_response("key-a", "resp_alone") is not None


async def test_concurrent_puts_from_two_instances(opener: Opener) -> None:
    """Two instances (processes, replicas) store responses at the same time, some under
    the same ids: every one is whole, and the indexes agree with the records."""
    one, two = await opener(), await opener()

    async def write(store: SessionStore, who: str) -> None:
        for i in range(30):
            await store.put_response(
                stored(f"resp_{who}{i}", session_id="s-mine", text=f"{who}{i}")
            )
            # both write these ids, each in its own session
            big = "ü" * 20_000 + who
            await store.put_response(
                stored(f"resp_shared{i}", created=float(i), session_id=f"s-{who}", text=big)
            )

    await asyncio.gather(write(one, "x"), write(two, "y"))
    for i in range(30):
        for who in "xy":
            assert await two.get_response("key-a", f"resp_{who}{i}") == stored(
                f"resp_{who}{i}", session_id="s-mine", text=f"{who}{i}"
            )
        got = await one.get_response("key-a", f"resp_shared{i}")
        assert got is not None and got.session_id in ("s-x", "s-y")
        winner = got.session_id[-1]
        assert got == stored(
            f"resp_shared{i}",
            created=float(i),
            session_id=f"s-{winner}",
            text="ü" * 20_000 + winner,
        )
    # each shared response sits in the session of the record that won, and only there
    holders = {i: (await one.get_response("key-a", f"resp_shared{i}")) for i in range(30)}
    await two.delete_session("key-a", "s-x")
    for i, held in holders.items():
        after = await one.get_response("key-a", f"resp_shared{i}")
        assert held is not None
        assert (after is None) == (held.session_id == "s-x")
    await one.delete_session("key-a", "s-mine")
    for i in range(30):
        assert await two.get_response("key-a", f"resp_x{i}") is None


async def test_another_instance_sees_the_responses(opener: Opener) -> None:
    first = await opener()
    if isinstance(first, MemoryStore):
        pytest.skip("a memory store is private to its process")
    await first.put_response(stored())
    await first.close()
    second = await opener()
    assert await second.get_response("key-a", "resp_1") == stored()


# the schema of the SQLite store before stored responses (git show of the store's
# _SCHEMA at that point), to make a file as that version left it
OLD_SQLITE_SCHEMA = """
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
"""


def _tables(path: Path) -> set[str]:
    con = sqlite3.connect(path)
    try:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()


async def test_a_sqlite_file_of_the_old_schema_opens_and_gains_responses(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("BEGIN IMMEDIATE")
    for statement in OLD_SQLITE_SCHEMA.split(";"):
        if statement.strip():
            con.execute(statement)
    con.execute(
        "INSERT INTO sessions VALUES ('key-a', 'sess_1', 1000.0, 1000.0, 'new', 'key-a', "
        "'m1', 1, 3, 2, 5)"
    )
    con.execute(
        "INSERT INTO turns VALUES ('key-a', 'sess_1', 1, ?)",
        (json.dumps({"messages": [{"role": "user", "content": "old ✓"}]}, ensure_ascii=False),),
    )
    con.execute("INSERT INTO history VALUES ('key-a', 'd-old', 'sess_1')")
    con.execute("COMMIT")
    con.close()
    assert "responses" not in _tables(path)

    store = await SQLiteStore.open(str(path))
    try:
        assert "responses" in _tables(path)
        assert await store.find_session("key-a", "d-old") == "sess_1"
        session = await store.get_session("key-a", "sess_1")
        assert session is not None and session.turn_count == 1
        assert session.turns == [{"messages": [{"role": "user", "content": "old ✓"}]}]
        await store.put_response(stored())
        assert await store.get_response("key-a", "resp_1") == stored()
    finally:
        await store.close()
    # and opens again, keeping what it holds
    again = await SQLiteStore.open(str(path))
    try:
        assert await again.get_response("key-a", "resp_1") == stored()
        assert await again.delete_session("key-a", "sess_1") is True
        assert await again.get_response("key-a", "resp_1") is None
    finally:
        await again.close()
