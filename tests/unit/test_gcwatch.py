"""What the cyclic collector has to do: nothing left in reference cycles by a
request, a memory store whose sessions cost it a few containers each, bounded by
evicting the least recently updated, and every pause measured."""

from __future__ import annotations

import gc
import logging
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy import gcwatch
from proxy.sessions.store import MemoryStore, TurnRecord
from tests.fixtures import DONE, ProxyFactory, chat_body, chunk, completion, metric

FULL = """
upstreams:
  - name: main
    url: {backend}
store: {backend: memory}
middleware:
  - type: auth
    keys: [{id: k, key: sk-k}]
  - type: rate_limit
    requests_per_minute: 1000000
    tokens_per_minute: 1000000000
    max_concurrent: 1000
  - type: validate
  - type: session
  - type: model_override
    aliases: {small: test-model}
"""


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_request_through_the_full_chain_leaves_no_reference_cycles(
    make_proxy: ProxyFactory, stream: bool
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        if stream:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(chunk("Hi", role="assistant") + chunk(None, finish="stop") + DONE)
            await resp.write_eof()
            return resp
        return web.json_response(completion())

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    backend = TestServer(app)
    await backend.start_server()
    try:
        client = await make_proxy(FULL.replace("{backend}", str(backend.make_url("/v1"))))
        headers = {"Authorization": "Bearer sk-k"}

        async def one(i: int) -> None:
            resp = await client.post(
                "/v1/chat/completions", json=chat_body(f"q{i}", stream=stream), headers=headers
            )
            assert resp.status == 200
            await resp.read()

        for i in range(30):  # warm: caches filled, the writer started
            await one(i)
        gc.collect()
        gc.disable()
        try:
            for i in range(200):
                await one(1000 + i)
            found = gc.collect()
        finally:
            gc.enable()
    finally:
        await backend.close()
    # the test client, the stand-in backend and the proxy share this process: all of
    # them together leave (next to) nothing for the collector
    assert found / 200 < 0.5, found


def record(owner: str, sid: str, at: float, n: int) -> TurnRecord:
    turn = {
        "created": int(at),
        "messages": [{"role": "user", "content": f"question {n}"}],
        "response": {"role": "assistant", "content": f"answer {n}", "tool_calls": None},
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    return TurnRecord(
        owner=owner, session_id=sid, at=at, source="new", key_id=owner, model="m", turn=turn
    )


async def test_memory_store_sessions_cost_the_collector_a_few_containers_each() -> None:
    store = MemoryStore()
    gc.collect()
    before = len(gc.get_objects())
    for s in range(500):
        await store.record_turns([record("k", f"s{s}", 1.0 + s, t) for t in range(8)])
    gc.collect()
    per_session = (len(gc.get_objects()) - before) / 500
    # a session, its list of turn texts and its key: eight turns of nested dicts would
    # be more than 60 tracked objects
    assert per_session < 6, per_session
    session = await store.get_session("k", "s7")
    assert session is not None and session.turns is not None and len(session.turns) == 8
    assert session.turns[3]["response"]["content"] == "answer 3"


async def test_a_full_memory_store_evicts_the_least_recently_updated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore(max_sessions=3)
    for s, at in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        await store.record_turns([record("k", s, at, 0)])
    await store.record_turns([record("k", "a", 4.0, 1)])  # a is used again
    with caplog.at_level(logging.INFO, logger="chat_proxy.sessions"):
        await store.record_turns([record("k", "d", 5.0, 0)])
    assert await store.get_session("k", "b") is None
    for kept in ("a", "c", "d"):
        assert await store.get_session("k", kept) is not None
    assert any("evicted 1" in r.getMessage() for r in caplog.records)
    assert store.evicted == 1


async def test_collections_are_timed_by_generation(make_proxy: ProxyFactory) -> None:
    gcwatch.install()
    client = await make_proxy('upstreams:\n  - name: main\n    url: "echo:"\n')
    text = await (await client.get("/metrics")).text()
    before = metric(text, "chat_proxy_gc_pause_seconds_count", generation="2")
    garbage: list[Any] = []
    garbage.append(garbage)  # a cycle, for the collector to find
    del garbage
    gc.collect()
    text = await (await client.get("/metrics")).text()
    assert metric(text, "chat_proxy_gc_pause_seconds_count", generation="2") == before + 1
    assert metric(text, "chat_proxy_gc_pause_max_seconds", generation="2") > 0
