"""What the session middleware records: the turn as the request and the response were
when the response completed (later changes to them do not reach the store), values
that only the standard JSON encoder writes (NaN, integers beyond 64 bits) kept as they
were, and a turn whose stream was cut short marked so, on every store that keeps
sessions in this process or a file; and a continuation lookup that hangs or fails
starts a new session."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy.chain import BuildContext
from proxy.exchange import Exchange, Identity
from proxy.routes import CHAT
from proxy.sessions import middleware as session_mw
from proxy.sessions.options import SessionOptions
from proxy.sessions.store import MemoryStore, SessionStore


async def run_turn(
    store: SessionStore,
    messages: list[Any],
    reply: dict[str, Any],
    *,
    store_content: bool = True,
    after: Any = None,
    headers: dict[str, str] | None = None,
    incomplete: bool = False,
) -> str:
    """One chat request through the session middleware; `after(ex)` runs once the
    turn is recorded, as a later completion callback would."""
    ctx = BuildContext(config=None, store=store)  # type: ignore[arg-type]
    feature = session_mw.session(SessionOptions(store_content=store_content), ctx)
    mw = feature.middleware
    for hook in feature.startup:
        await hook()
    request = make_mocked_request("POST", "/v1/chat/completions", headers=headers or {})
    ex = Exchange(request=request, route=CHAT, scope="chat", request_id="r1")
    ex.identity = Identity(id="k", scopes=frozenset({"chat"}))
    ex.body = {"model": "m", "messages": messages}

    async def backend(ex: Exchange) -> web.StreamResponse:
        ex.completion = {
            "model": "m",
            "choices": [
                {"index": 0, "message": reply, "finish_reason": None if incomplete else "stop"}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        }
        ex.incomplete = incomplete  # as the relay says of a stream cut short
        for callback in ex.on_complete:
            callback(ex)
        if after is not None:
            after(ex)
        return web.Response()

    await mw(ex, backend)
    for hook in reversed(feature.shutdown):
        await hook()  # flushes the writer
    assert ex.session_id is not None
    return ex.session_id


async def turns(store: SessionStore, sid: str) -> list[Any]:
    got = await store.get_session("k", sid)
    assert got is not None and got.turns is not None
    return got.turns


async def test_the_turn_is_the_exchange_as_it_completed(store: SessionStore) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi ✓"}]},
    ]
    reply = {"role": "assistant", "content": "hello", "tool_calls": [{"id": "c1"}]}

    def meddle(ex: Exchange) -> None:
        assert ex.body is not None
        ex.body["messages"][1]["content"][0]["text"] = "changed"
        ex.body["messages"].append({"role": "user", "content": "added"})
        reply["tool_calls"].append({"id": "c2"})
        reply["content"] = "changed"

    sid = await run_turn(store, messages, reply, after=meddle)
    (turn,) = await turns(store, sid)
    assert turn["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi ✓"}]},
    ]
    assert turn["response"] == {
        "role": "assistant",
        "content": "hello",
        "tool_calls": [{"id": "c1"}],
    }
    assert turn["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert turn["finish_reason"] == "stop" and turn["model"] == "m"


@pytest.mark.parametrize("value", [math.nan, math.inf, 2**70, -0.0, 1e16], ids=repr)
async def test_values_only_the_standard_encoder_writes_are_kept(
    store: SessionStore, value: Any
) -> None:
    messages = [{"role": "user", "content": [{"type": "x", "value": value}]}]
    sid = await run_turn(store, messages, {"role": "assistant", "content": "ok"})
    (turn,) = await turns(store, sid)
    assert repr(turn["messages"][0]["content"][0]["value"]) == repr(value)


async def test_an_opening_turn_with_odd_values_and_redaction(store: SessionStore) -> None:
    messages = [
        {"role": "system", "content": "sys", "extra": math.nan},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "q", "tool_call_id": "t1"},
    ]
    sid = await run_turn(
        store, messages, {"role": "assistant", "content": "a"}, headers={"X-Session-Id": "s-1"}
    )
    assert sid == "s-1"
    (turn,) = await turns(store, sid)
    # a session named by the client opens with the whole context it was sent
    assert [m["content"] for m in turn["messages"]] == ["sys", "hi", "q"]
    assert math.isnan(turn["messages"][0]["extra"])

    sid = await run_turn(
        store,
        [{"role": "user", "content": "secret", "tool_call_id": "t2"}],
        {"role": "assistant", "content": "hidden"},
        store_content=False,
    )
    (turn,) = await turns(store, sid)
    assert turn["messages"] == [{"role": "user", "tool_call_id": "t2"}]
    assert turn["response"] == {"role": "assistant", "content": None, "tool_calls": None}
    assert "secret" not in orjson.dumps(turn).decode()


@pytest.mark.parametrize("store_content", [True, False], ids=["content", "no-content"])
async def test_a_stream_cut_short_is_marked_in_its_turn(
    store: SessionStore, store_content: bool
) -> None:
    messages = [{"role": "user", "content": "tell me a story"}]
    reply = {"role": "assistant", "content": "Once upon a"}
    sid = await run_turn(store, messages, reply, store_content=store_content, incomplete=True)
    (turn,) = await turns(store, sid)
    assert turn["incomplete"] is True
    assert turn["finish_reason"] is None
    assert turn["response"]["content"] == ("Once upon a" if store_content else None)

    # a complete turn has no such field
    sid = await run_turn(store, messages, reply, store_content=store_content)
    (turn,) = await turns(store, sid)
    assert "incomplete" not in turn
    assert turn["finish_reason"] == "stop"


class SlowStore(MemoryStore):
    """A memory store whose continuation lookups hang, or fail."""

    def __init__(self, fail: bool) -> None:
        super().__init__()
        self.fail = fail
        self.lookups = 0

    async def find_session(self, owner: str, digest: str) -> str | None:
        self.lookups += 1
        if self.fail:
            raise OSError("the store is gone")
        await asyncio.sleep(30)
        return "never"


@pytest.mark.parametrize("fail", [False, True], ids=["slow", "failing"])
async def test_a_lookup_that_hangs_or_fails_starts_a_new_session(
    monkeypatch: pytest.MonkeyPatch, fail: bool
) -> None:
    monkeypatch.setattr(session_mw, "LOOKUP_TIMEOUT", 0.05)
    store = SlowStore(fail)
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]
    started = time.monotonic()
    sid = await run_turn(store, history, {"role": "assistant", "content": "ok"})
    assert time.monotonic() - started < 5
    assert store.lookups == 1
    assert sid.startswith("sess_")
    (turn,) = await turns(store, sid)
    # a new session's first turn holds the whole context it opened with
    assert [m["content"] for m in turn["messages"]] == ["hi", "hello", "again"]
