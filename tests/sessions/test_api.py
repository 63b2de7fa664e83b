"""The Sessions API through HTTP: listing, paging, deleting, retention, and what is
kept when message text must not be stored."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy.sessions import ids, middleware
from tests.fixtures import ProxyFactory
from tests.sessions.fixtures import REDIS_URL, chat, config, fetch, user


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(ids, "clock", fake)
    return fake


async def test_list_pages_newest_first(
    make_proxy: ProxyFactory, sqlite_store: dict[str, Any], clock: Clock
) -> None:
    client = await make_proxy(config(sqlite_store))
    ids = []
    for i in range(5):
        clock.now += 10
        ids.append((await chat(client, [user(f"session {i}")], key="k"))[0])
    await chat(client, [user("someone else's")], key="other")
    # a new turn makes a session the most recent
    clock.now += 10
    await chat(client, [user("again")], key="k", headers={"X-Session-Id": ids[1]})
    newest_first = [ids[1], ids[4], ids[3], ids[2], ids[0]]

    resp = await client.get("/v1/sessions", headers={"X-Test-Key": "k"})
    assert resp.status == 200
    doc = await resp.json()
    assert doc["object"] == "list"
    assert [s["id"] for s in doc["data"]] == newest_first
    assert (doc["first_id"], doc["last_id"], doc["has_more"]) == (ids[1], ids[0], False)
    top = doc["data"][0]
    assert set(top) == {
        "id",
        "object",
        "created",
        "updated",
        "source",
        "key_id",
        "model",
        "turn_count",
        "usage",
    }
    assert top["turn_count"] == 2 and top["key_id"] == "k" and top["source"] == "header"
    assert top["updated"] > top["created"]

    page = await (await client.get("/v1/sessions?limit=2", headers={"X-Test-Key": "k"})).json()
    assert [s["id"] for s in page["data"]] == newest_first[:2]
    assert (page["first_id"], page["last_id"], page["has_more"]) == (ids[1], ids[4], True)
    page = await (
        await client.get(f"/v1/sessions?limit=2&after={ids[4]}", headers={"X-Test-Key": "k"})
    ).json()
    assert [s["id"] for s in page["data"]] == newest_first[2:4]
    assert page["has_more"] is True
    page = await (
        await client.get(f"/v1/sessions?limit=2&after={ids[2]}", headers={"X-Test-Key": "k"})
    ).json()
    assert [s["id"] for s in page["data"]] == [ids[0]]
    assert page["has_more"] is False

    empty = await (await client.get("/v1/sessions", headers={"X-Test-Key": "nobody"})).json()
    assert empty == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }


async def test_generated_ids_page_on_every_store(
    make_proxy: ProxyFactory, any_store: dict[str, Any], clock: Clock
) -> None:
    """Generated ids as `after` cursors: each store walks every session once, most
    recently updated first, and sessions updated at the same instant (these share
    their id's time too) by id, higher first."""
    client = await make_proxy(config(any_store))
    tied = [(await chat(client, [user(f"tied {i}")], key="k"))[0] for i in range(3)]
    later = []
    for i in range(3):
        clock.now += 10
        later.append((await chat(client, [user(f"later {i}")], key="k"))[0])
    expected = [*reversed(later), *sorted(tied, reverse=True)]

    walked: list[str] = []
    after = ""
    while True:
        query = f"/v1/sessions?limit=2&after={after}" if after else "/v1/sessions?limit=2"
        page = await (await client.get(query, headers={"X-Test-Key": "k"})).json()
        walked += [s["id"] for s in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert walked == expected


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=101", "limit=ten", "limit=-1", "limit=2.5", "limit="]
)
async def test_limit_out_of_range_is_400(make_proxy: ProxyFactory, query: str) -> None:
    client = await make_proxy(config({"backend": "memory"}))
    resp = await client.get(f"/v1/sessions?{query}")
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "limit"
    assert error["type"] == "invalid_request_error"


async def test_limit_bounds_are_accepted(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(config({"backend": "memory"}))
    for limit in (1, 100):
        assert (await client.get(f"/v1/sessions?limit={limit}")).status == 200


async def test_after_must_name_one_of_your_sessions(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(config({"backend": "memory"}))
    theirs, _ = await chat(client, [user("hi")], key="a")
    for after in ("sess_unknown", theirs):
        resp = await client.get(f"/v1/sessions?after={after}", headers={"X-Test-Key": "b"})
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "after"


async def test_delete(make_proxy: ProxyFactory, sqlite_store: dict[str, Any]) -> None:
    client = await make_proxy(config(sqlite_store))
    history = [user("delete me")]
    sid, doc = await chat(client, history)
    resp = await client.delete(f"/v1/sessions/{sid}")
    assert resp.status == 200
    assert await resp.json() == {"id": sid, "object": "session.deleted", "deleted": True}
    assert (await fetch(client, sid))[0] == 404
    again = await client.delete(f"/v1/sessions/{sid}")
    assert again.status == 404
    assert (await again.json())["error"]["code"] == "not_found"
    listed = await (await client.get("/v1/sessions")).json()
    assert listed["data"] == []
    # the deleted conversation is not continued into the deleted id
    new, _ = await chat(client, [*history, doc["choices"][0]["message"], user("more")])
    assert new != sid


async def test_methods_and_paths(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(config({"backend": "memory"}))
    resp = await client.post("/v1/sessions", json={})
    assert resp.status == 405
    assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert (await client.delete("/v1/sessions")).status == 405
    assert (await client.put("/v1/sessions/abc", json={})).status == 405
    resp = await client.get("/v1/sessions/abc/turns")
    assert resp.status == 404


MARKER = "zebra quokka 7731"


async def _converse(client: Any) -> str:
    history = [{"role": "system", "content": f"system {MARKER}"}, user(f"first {MARKER}")]
    sid, doc = await chat(client, history)
    history += [doc["choices"][0]["message"], user(f"second {MARKER}")]
    again, _ = await chat(client, history)
    assert again == sid  # matching works without stored text
    status, session = await fetch(client, sid)  # also waits for the writes
    assert status == 200
    assert session["turn_count"] == 2
    assert session["usage"]["total_tokens"] > 0
    assert MARKER not in str(session)
    first, second = session["turns"]
    assert first["messages"] == [{"role": "system"}, {"role": "user"}]
    assert second["messages"] == [{"role": "user"}]
    assert first["response"] == {"role": "assistant", "content": None, "tool_calls": None}
    assert first["usage"]["completion_tokens"] > 0 and first["finish_reason"] == "stop"
    return sid


async def test_store_content_false_keeps_no_text_in_sqlite(
    make_proxy: ProxyFactory, sqlite_store: dict[str, Any]
) -> None:
    client = await make_proxy(config(sqlite_store, {"store_content": False}))
    await _converse(client)
    await client.close()
    files = list(Path(sqlite_store["path"]).parent.iterdir())
    assert files
    for path in files:
        data = path.read_bytes()
        assert MARKER.encode() not in data
        assert b"quokka" not in data


async def test_store_content_false_keeps_no_text_in_redis(
    make_proxy: ProxyFactory, redis_store: dict[str, Any]
) -> None:
    client = await make_proxy(config(redis_store, {"store_content": False}))
    await _converse(client)
    r = aioredis.from_url(REDIS_URL, decode_responses=True)
    try:
        keys = [k async for k in r.scan_iter(match=redis_store["prefix"] + "*")]
        assert keys
        for key in keys:
            kind = await r.type(key)
            value: Any = {
                "string": r.get,
                "hash": r.hgetall,
                "list": lambda k: r.lrange(k, 0, -1),
                "set": r.smembers,
                "zset": lambda k: r.zrange(k, 0, -1),
            }[kind](key)
            assert "quokka" not in str(await value) + key
    finally:
        await r.aclose()


async def test_store_content_true_keeps_the_text(
    make_proxy: ProxyFactory, sqlite_store: dict[str, Any]
) -> None:
    client = await make_proxy(config(sqlite_store))
    sid, _ = await chat(client, [user(f"keep {MARKER}")])
    status, session = await fetch(client, sid)
    assert session["turns"][0]["messages"] == [user(f"keep {MARKER}")]
    assert session["turns"][0]["response"]["content"] == f"You said: keep {MARKER}"


async def test_retention_purges_idle_sessions(
    make_proxy: ProxyFactory,
    sqlite_store: dict[str, Any],
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(middleware, "PURGE_EVERY", 0.05)
    client = await make_proxy(config(sqlite_store, {"retention_days": 7}))
    old_history = [user("six days ago")]
    clock.now -= 6 * 86400
    old, doc = await chat(client, old_history)
    assert (await fetch(client, old))[0] == 200  # within retention: kept
    clock.now += 8 * 86400  # two days later, it has been idle for eight
    recent, _ = await chat(client, [user("today")])
    for _ in range(100):
        if (await fetch(client, old))[0] == 404:
            break
        await asyncio.sleep(0.05)
    assert (await fetch(client, old))[0] == 404
    assert (await fetch(client, recent))[0] == 200
    listed = await (await client.get("/v1/sessions")).json()
    assert [s["id"] for s in listed["data"]] == [recent]
    # the purged conversation starts over
    sid, _ = await chat(client, [*old_history, doc["choices"][0]["message"], user("back")])
    assert sid not in (old, recent)


async def test_retention_purge_on_start(
    make_proxy: ProxyFactory, sqlite_store: dict[str, Any], clock: Clock
) -> None:
    first = await make_proxy(config(sqlite_store, {"retention_days": 1}))
    clock.now -= 2 * 86400
    old, _ = await chat(first, [user("old")])
    assert (await fetch(first, old))[0] == 200
    clock.now += 2 * 86400
    await first.close()
    second = await make_proxy(config(sqlite_store, {"retention_days": 1}))
    for _ in range(100):  # the purge runs in the background as the proxy starts
        if (await fetch(second, old))[0] == 404:
            break
        await asyncio.sleep(0.02)
    assert (await fetch(second, old))[0] == 404


async def test_an_unreachable_store_does_not_fail_chat(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(config({"backend": "redis", "url": "redis://127.0.0.1:1/0"}))
    history = [user("hello")]
    sid, doc = await chat(client, history)
    assert sid.startswith("sess_")
    history += [doc["choices"][0]["message"], user("again")]
    sid2, doc2 = await chat(client, history)
    assert doc2["choices"][0]["message"]["content"] == "You said: again"
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["store"] == "down"
