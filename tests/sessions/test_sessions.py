"""Automatic sessions through HTTP: detection, continuation, ownership, persistence."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from typing import Any

import openai

from tests.fixtures import (
    BASIC,
    DONE,
    Backend,
    ProxyFactory,
    chunk,
    json_handler,
    sse_handler,
    usage_chunk,
)
from tests.sessions.fixtures import ANONYMOUS, GENERATED, chat, config, fetch, forwarded, said, user


async def test_a_single_message_starts_a_session_sent_both_ways(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(config({"backend": "memory"}, url="{backend}"), backend)
    resp = await client.post(
        "/v1/chat/completions", json={"model": "test-model", "messages": [user("Hi")]}
    )
    assert resp.status == 200
    sid = resp.headers["X-Session-Id"]
    assert GENERATED.match(sid)
    assert backend.seen[-1].headers["X-Session-Id"] == forwarded(ANONYMOUS, sid) != sid

    status, doc = await fetch(client, sid)
    assert status == 200
    assert doc["id"] == sid
    assert doc["object"] == "session"
    assert doc["source"] == "new"
    assert doc["key_id"] is None
    assert doc["model"] == "test-model"
    assert doc["turn_count"] == 1
    assert doc["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert isinstance(doc["created"], int) and doc["updated"] >= doc["created"]
    [turn] = doc["turns"]
    assert turn["messages"] == [user("Hi")]
    assert turn["response"] == {"role": "assistant", "content": "Hello!", "tool_calls": None}
    assert turn["finish_reason"] == "stop"
    assert turn["model"] == "test-model"
    assert turn["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert isinstance(turn["latency_ms"], int) and turn["latency_ms"] >= 0

    # another single message is another session
    resp = await client.post(
        "/v1/chat/completions", json={"model": "test-model", "messages": [user("Hi")]}
    )
    assert resp.headers["X-Session-Id"] != sid


async def test_new_session_ids_are_random_not_counted(
    make_proxy: ProxyFactory, any_store: dict[str, Any]
) -> None:
    client = await make_proxy(config(any_store))
    before = int(time.time() * 1000)
    first, _ = await chat(client, [user("one")])
    second, _ = await chat(client, [user("two")])
    after = int(time.time() * 1000)
    shapes = [GENERATED.match(sid) for sid in (first, second)]
    assert all(shapes)
    times = [int(sid[5:17], 16) for sid in (first, second)]
    assert before <= times[0] <= times[1] <= after
    one, two = (sid[17:] for sid in (first, second))
    # no prefix drawn once per process, no counter after it: the 128 bits after the
    # time share no more than chance would (8 digits: once in 4 billion), and are not
    # a small step apart
    shared = next((i for i, (a, b) in enumerate(zip(one, two, strict=True)) if a != b), 32)
    assert shared < 8
    assert abs(int(one, 16) - int(two, 16)) > 2**64
    # each id is a session every store keeps, and a client may pin it by header
    for sid in (first, second):
        assert (await fetch(client, sid))[0] == 200
    pinned, _ = await chat(client, [user("three")], headers={"X-Session-Id": first})
    assert pinned == first
    assert (await fetch(client, first))[1]["turn_count"] == 2


async def test_appending_the_reply_continues_the_session(
    make_proxy: ProxyFactory, any_store: dict[str, Any]
) -> None:
    client = await make_proxy(config(any_store))
    system = {"role": "system", "content": "You are terse."}
    history: list[dict[str, Any]] = [system, user("one")]
    first, doc = await chat(client, history)
    for word in ("two", "three"):
        history += [doc["choices"][0]["message"], user(word)]
        sid, doc = await chat(client, history)
        assert sid == first
    status, session = await fetch(client, first)
    assert status == 200
    assert session["turn_count"] == 3
    assert session["source"] == "continued"
    assert [t["messages"] for t in session["turns"]] == [
        [system, user("one")],
        [user("two")],
        [user("three")],
    ]
    assert [t["response"]["content"] for t in session["turns"]] == [
        "You said: one",
        "You said: two",
        "You said: three",
    ]
    usages = [t["usage"] for t in session["turns"]]
    assert session["usage"] == {
        k: sum(u[k] for u in usages) for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    }

    # a conversation the proxy has not seen starts a session of its own
    sid, _ = await chat(client, [user("one"), said("something else"), user("two")])
    assert sid != first and GENERATED.match(sid)


async def test_sdk_streamed_conversation_is_one_session(
    make_proxy: ProxyFactory, sqlite_store: dict[str, Any]
) -> None:
    client = await make_proxy(config(sqlite_store))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
    messages: list[Any] = [{"role": "system", "content": "Be helpful."}]
    ids: list[str] = []
    replies: list[str] = []
    totals = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for text in ("hello there", "tell me more", "and then?", "thanks, bye"):
        messages.append({"role": "user", "content": text})
        raw = await sdk.chat.completions.with_raw_response.create(
            model="echo", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        ids.append(raw.headers["x-session-id"])
        reply = ""
        async for part in raw.parse():
            if part.choices:
                reply += part.choices[0].delta.content or ""
            if part.usage:
                for k in totals:
                    totals[k] += getattr(part.usage, k)
        assert reply == f"You said: {text}"
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply})
    assert len(set(ids)) == 1
    status, session = await fetch(client, ids[0])
    assert status == 200
    assert session["turn_count"] == 4
    assert session["usage"] == totals
    assert [t["response"]["content"] for t in session["turns"]] == replies
    assert [t["messages"][-1]["content"] for t in session["turns"]] == [
        "hello there",
        "tell me more",
        "and then?",
        "thanks, bye",
    ]
    assert all(t["finish_reason"] == "stop" for t in session["turns"])


async def test_a_tool_call_reply_is_continued(make_proxy: ProxyFactory, backend: Backend) -> None:
    call = {
        "index": 0,
        "id": "call_abc",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    backend.chat(
        sse_handler(
            chunk(None, role="assistant", tool_calls=[call]),
            chunk(None, tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
            chunk(
                None, tool_calls=[{"index": 0, "function": {"arguments": '"Paris", "unit": "C"}'}}]
            ),
            chunk(None, finish="tool_calls"),
            usage_chunk(10, 5),
            DONE,
        )
    )
    client = await make_proxy(config({"backend": "memory"}, url="{backend}"), backend)
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    ]
    history: list[dict[str, Any]] = [user("Weather in Paris?")]
    resp = await client.post(
        "/v1/chat/completions",
        json={
            "model": "test-model",
            "messages": history,
            "tools": tools,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    await resp.read()
    first = resp.headers["X-Session-Id"]

    # the client re-serialises the arguments and answers with the tool's result
    history += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": json.dumps({"unit": "C", "city": "Paris"}),
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": "18 degrees"},
    ]
    backend.chat(json_handler({
        "id": "c2", "object": "chat.completion", "created": 1, "model": "test-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "It is 18  degrees\nin Paris."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 6, "total_tokens": 26},
    }))  # fmt: skip
    resp = await client.post(
        "/v1/chat/completions", json={"model": "test-model", "messages": history, "tools": tools}
    )
    assert resp.headers["X-Session-Id"] == first

    # whitespace in the echoed reply does not matter
    history += [{"role": "assistant", "content": "It is 18 degrees in Paris. "}, user("Thanks!")]
    resp = await client.post(
        "/v1/chat/completions", json={"model": "test-model", "messages": history}
    )
    assert resp.headers["X-Session-Id"] == first

    status, session = await fetch(client, first)
    assert status == 200
    assert session["turn_count"] == 3
    one, two, three = session["turns"]
    assert one["finish_reason"] == "tool_calls"
    assert one["response"]["tool_calls"] == [
        {
            "id": "call_abc",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'},
        }
    ]
    assert one["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert two["messages"] == [
        {"role": "tool", "tool_call_id": "call_abc", "content": "18 degrees"}
    ]
    assert three["messages"] == [user("Thanks!")]
    assert session["usage"]["total_tokens"] == 15 + 26 + 26


async def test_a_stream_cut_short_is_marked_in_its_turn(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(config({"backend": "memory"}, url="{backend}"), backend)
    body = {"model": "test-model", "messages": [user("Tell me a story")], "stream": True}
    # three events, no finish_reason, no [DONE]: the backend closed mid-answer
    backend.chat(sse_handler(chunk("Once", role="assistant"), chunk(" upon"), chunk(" a")))
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    await resp.read()
    cut = resp.headers["X-Session-Id"]
    # the same answer in full
    backend.chat(sse_handler(chunk("Once", role="assistant"), chunk(" upon"), chunk(" a"), chunk(" time", finish="stop"), DONE))  # fmt: skip
    resp = await client.post("/v1/chat/completions", json=body)
    await resp.read()
    whole = resp.headers["X-Session-Id"]

    status, session = await fetch(client, cut)
    assert status == 200
    [turn] = session["turns"]
    assert turn["incomplete"] is True
    assert turn["response"]["content"] == "Once upon a"
    assert turn["finish_reason"] is None
    status, session = await fetch(client, whole)
    [turn] = session["turns"]
    assert "incomplete" not in turn  # a complete turn has no such field
    assert turn["response"]["content"] == "Once upon a time"
    assert turn["finish_reason"] == "stop"


async def test_a_client_that_trims_its_history_continues(
    make_proxy: ProxyFactory, any_store: dict[str, Any]
) -> None:
    client = await make_proxy(config(any_store))
    system = {"role": "system", "content": "Keep it short."}
    full: list[dict[str, Any]] = []
    ids = set()
    for i in range(8):
        full.append(user(f"message number {i}"))
        sent = [system, *full[-5:]]  # the system prompt and the last five messages
        sid, doc = await chat(client, sent)
        ids.add(sid)
        full.append(doc["choices"][0]["message"])
    assert len(ids) == 1
    status, session = await fetch(client, ids.pop())
    assert status == 200
    assert session["turn_count"] == 8
    assert session["turns"][-1]["messages"] == [user("message number 7")]

    # kept down to the last user message and the reply before the new one
    sid, _ = await chat(client, [full[-2], full[-1], user("one more")])
    assert sid == session["id"]


async def test_a_restarted_proxy_keeps_and_continues_sqlite_sessions(
    make_proxy: ProxyFactory, sqlite_store: dict[str, Any]
) -> None:
    text = config(sqlite_store)
    first = await make_proxy(text)
    history = [user("remember me")]
    sid, doc = await chat(first, history, key="k1")
    history += [doc["choices"][0]["message"], user("still there?")]
    assert (await chat(first, history, key="k1"))[0] == sid
    await first.close()  # shuts the app down: pending writes are flushed, the store closed

    second = await make_proxy(text)
    status, session = await fetch(second, sid, key="k1")
    assert status == 200
    assert session["turn_count"] == 2
    assert session["key_id"] == "k1"
    history += [session["turns"][-1]["response"], user("good")]
    history[-2] = {k: v for k, v in history[-2].items() if v is not None}
    again, _ = await chat(second, history, key="k1")
    assert again == sid
    status, session = await fetch(second, sid, key="k1")
    assert session["turn_count"] == 3


async def test_a_turn_is_on_disk_while_the_proxy_runs(
    make_proxy: ProxyFactory, sqlite_store: dict[str, Any]
) -> None:
    client = await make_proxy(config(sqlite_store))
    sid, _ = await chat(client, [user("persist this")])
    found = None
    for _ in range(100):  # the background writer commits within milliseconds
        con = sqlite3.connect(sqlite_store["path"])
        try:
            found = con.execute("SELECT turn_count FROM sessions WHERE id = ?", (sid,)).fetchone()
        finally:
            con.close()
        if found:
            break
        await asyncio.sleep(0.05)
    assert found == (1,)


async def test_elevenlabs_conversation_id(make_proxy: ProxyFactory, backend: Backend) -> None:
    client = await make_proxy(config({"backend": "memory"}, url="{backend}"), backend)
    opening = [
        {"role": "system", "content": "You are an agent."},
        {"role": "assistant", "content": "Hi, how can I help?"},
        user("Book a table"),
    ]
    extra = {"conversation_id": "conv_01jabc", "other": 1}
    body = {"model": "test-model", "messages": opening, "elevenlabs_extra_body": extra}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    assert resp.headers["X-Session-Id"] == "conv_01jabc"
    sent = backend.seen[-1]
    assert "elevenlabs_extra_body" not in sent.json()
    assert sent.json()["messages"] == opening
    assert sent.headers["X-Session-Id"] == forwarded(ANONYMOUS, "conv_01jabc")

    # it wins over a header, and over a history the proxy has never seen
    body["messages"] = [*opening, said("x"), user("For two")]
    resp = await client.post("/v1/chat/completions", json=body, headers={"X-Session-Id": "other"})
    assert resp.headers["X-Session-Id"] == "conv_01jabc"
    status, session = await fetch(client, "conv_01jabc")
    assert status == 200
    assert session["source"] == "elevenlabs"
    assert session["turn_count"] == 2
    # the first turn keeps the context the conversation opened with
    assert [t["messages"] for t in session["turns"]] == [opening, [user("For two")]]


async def test_elevenlabs_body_kept_aside_by_validate(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(
        config({"backend": "memory"}, url="{backend}", before=[{"type": "validate"}]), backend
    )
    body = {
        "model": "test-model",
        "messages": [user("hi")],
        "elevenlabs_extra_body": {"conversation_id": "conv_2"},
    }
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    assert resp.headers["X-Session-Id"] == "conv_2"
    assert "elevenlabs_extra_body" not in backend.seen[-1].json()
    assert backend.seen[-1].headers["X-Session-Id"] == forwarded(ANONYMOUS, "conv_2")


async def test_session_header(make_proxy: ProxyFactory, backend: Backend) -> None:
    client = await make_proxy(config({"backend": "memory"}, url="{backend}"), backend)
    for value in ("my-app:user-42.chat_7", "x" * 128):
        resp = await client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [user("hi")]},
            headers={"X-Session-Id": value},
        )
        assert resp.status == 200
        assert resp.headers["X-Session-Id"] == value
        assert backend.seen[-1].headers["X-Session-Id"] == forwarded(ANONYMOUS, value)
        status, session = await fetch(client, value)
        assert status == 200 and session["source"] == "header"
    calls = len(backend.seen)
    for bad in ("has space", "x" * 129, "semi;colon", "é"):
        resp = await client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [user("hi")]},
            headers={"X-Session-Id": bad.encode().decode("latin-1")},
        )
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["param"] == "X-Session-Id"
        assert error["type"] == "invalid_request_error"
    bad_body = {
        "model": "m",
        "messages": [user("hi")],
        "elevenlabs_extra_body": {"conversation_id": "a/b"},
    }
    resp = await client.post("/v1/chat/completions", json=bad_body)
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "elevenlabs_extra_body.conversation_id"
    assert len(backend.seen) == calls


async def test_each_key_sees_and_continues_only_its_own(
    make_proxy: ProxyFactory, sqlite_store: dict[str, Any]
) -> None:
    client = await make_proxy(config(sqlite_store))
    for key in ("alice", "bob"):
        sid, _ = await chat(
            client, [user(f"hi from {key}")], key=key, headers={"X-Session-Id": "shared-1"}
        )
        assert sid == "shared-1"
    for key in ("alice", "bob"):
        status, session = await fetch(client, "shared-1", key=key)
        assert status == 200
        assert session["key_id"] == key
        assert session["turn_count"] == 1
        assert session["turns"][0]["messages"] == [user(f"hi from {key}")]

    # a conversation is continued only under the key that had it
    history = [user("secret plan"), said("secret plan"), user("go on")]
    alice_first, _ = await chat(client, history[:1], key="alice")
    assert (await chat(client, history, key="alice"))[0] == alice_first
    bob_sid, _ = await chat(client, history, key="bob")
    assert bob_sid != alice_first

    # another key's session answers exactly like one that does not exist
    mallory = await client.get(f"/v1/sessions/{alice_first}", headers={"X-Test-Key": "mallory"})
    nobody_id = "sess_" + "0" * 44
    nobody = await client.get(f"/v1/sessions/{nobody_id}", headers={"X-Test-Key": "mallory"})
    assert mallory.status == nobody.status == 404
    m_err, n_err = (await mallory.json())["error"], (await nobody.json())["error"]
    assert m_err["message"].replace(alice_first, "ID") == n_err["message"].replace(nobody_id, "ID")
    assert {k: v for k, v in m_err.items() if k != "message"} == {
        k: v for k, v in n_err.items() if k != "message"
    }
    resp = await client.delete(f"/v1/sessions/{alice_first}", headers={"X-Test-Key": "bob"})
    assert resp.status == 404
    assert (await fetch(client, alice_first, key="alice"))[0] == 200
    listed = await (await client.get("/v1/sessions", headers={"X-Test-Key": "bob"})).json()
    assert {s["id"] for s in listed["data"]} == {"shared-1", bob_sid}


KEYS = {"alice": "sk-test-alice-0c4e1b", "bob": "sk-test-bob-7d92aa"}


def two_keys_config() -> str:
    """The auth middleware with the two keys of KEYS, then sessions in memory."""
    keys = "".join(
        f"      - id: {name}\n"
        f"        key_sha256: {hashlib.sha256(key.encode()).hexdigest()}\n"
        "        scopes: [chat, sessions:read]\n"
        for name, key in KEYS.items()
    )
    return (
        BASIC
        + "store: {backend: memory}\nmiddleware:\n  - type: auth\n    keys:\n"
        + keys
        + "  - type: session\n"
    )


async def test_keys_naming_one_conversation_reach_the_backend_apart(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(two_keys_config(), backend)

    async def turn(
        owner: str,
        messages: list[dict[str, Any]],
        header: str | None = None,
        conversation_id: str | None = None,
    ) -> tuple[str, str]:
        """A chat request of the owner's key: the id it got back, the id the backend got."""
        body: dict[str, Any] = {"model": "m", "messages": messages}
        if conversation_id is not None:
            body["elevenlabs_extra_body"] = {"conversation_id": conversation_id}
        headers = {"Authorization": f"Bearer {KEYS[owner]}"}
        if header is not None:
            headers["X-Session-Id"] = header
        resp = await client.post("/v1/chat/completions", json=body, headers=headers)
        assert resp.status == 200, await resp.text()
        return resp.headers["X-Session-Id"], backend.seen[-1].headers["X-Session-Id"]

    for how in ("header", "conversation_id"):
        name = f"shared-{how}"
        named = {"header": name} if how == "header" else {"conversation_id": name}
        sent: dict[str, list[str]] = {"alice": [], "bob": []}
        for owner in ("alice", "bob"):
            for n in range(2):
                back, forwarded_value = await turn(owner, [user(f"{how} {n}")], **named)
                assert back == name  # each client gets back the id it named
                sent[owner].append(forwarded_value)
        # each key's conversation reaches the backend under one id, the same from one
        # request to the next; the two keys' ids differ, and neither is the name
        (alice, alice_again), (bob, bob_again) = sent["alice"], sent["bob"]
        assert alice == alice_again and bob == bob_again
        assert alice != bob and name not in (alice, bob)
        assert (alice, bob) == (forwarded("alice", name), forwarded("bob", name))
        for owner, key in KEYS.items():
            resp = await client.get(
                f"/v1/sessions/{name}", headers={"Authorization": f"Bearer {key}"}
            )
            doc = await resp.json()
            assert resp.status == 200 and doc["key_id"] == owner and doc["turn_count"] == 2

    # one session, one id at the backend, whichever rule finds it: a named session
    # continued by its history; a generated one pinned by the header
    opening = [user("about the trip")]
    sid, first = await turn("alice", opening, header="trip-1")
    history = [*opening, {"role": "assistant", "content": "Hello!"}, user("more")]
    assert await turn("alice", history) == (sid, first)
    generated, first = await turn("alice", [user("a new one")])
    assert await turn("alice", [user("again")], header=generated) == (generated, first)
    # another key sending that id back is another conversation at the backend too
    back, theirs = await turn("bob", [user("mine now")], header=generated)
    assert back == generated and theirs not in (first, generated)


async def test_concurrent_continuations_add_up(
    make_proxy: ProxyFactory, shared_store: dict[str, Any]
) -> None:
    client = await make_proxy(config(shared_store))
    history = [user("start")]
    first, doc = await chat(client, history)
    history.append(doc["choices"][0]["message"])
    results = await asyncio.gather(
        *(chat(client, [*history, user(f"branch {i}")]) for i in range(6))
    )
    assert {sid for sid, _ in results} == {first}
    status, session = await fetch(client, first)
    assert status == 200
    assert session["turn_count"] == 7
    expected = doc["usage"]["total_tokens"] + sum(d["usage"]["total_tokens"] for _, d in results)
    assert session["usage"]["total_tokens"] == expected
    assert sorted(t["messages"][0]["content"] for t in session["turns"][1:]) == [
        f"branch {i}" for i in range(6)
    ]


async def test_replicas_share_redis_sessions(
    make_proxy: ProxyFactory, redis_store: dict[str, Any]
) -> None:
    one = await make_proxy(config(redis_store))
    two = await make_proxy(config(redis_store))
    sid, doc = await chat(one, [user("on replica one")], key="k")
    assert (await fetch(one, sid, key="k"))[0] == 200  # written
    again, _ = await chat(
        two, [user("on replica one"), doc["choices"][0]["message"], user("now two")], key="k"
    )
    assert again == sid
    status, session = await fetch(two, sid, key="k")
    assert status == 200 and session["turn_count"] == 2


async def test_forward_header_is_configurable(make_proxy: ProxyFactory, backend: Backend) -> None:
    client = await make_proxy(
        config({"backend": "memory"}, {"forward_header": "X-Conversation"}, url="{backend}"),
        backend,
    )
    resp = await client.post("/v1/chat/completions", json={"model": "m", "messages": [user("hi")]})
    sid = resp.headers["X-Session-Id"]
    assert backend.seen[-1].headers["X-Conversation"] == forwarded(ANONYMOUS, sid)
    assert "X-Session-Id" not in backend.seen[-1].headers


async def test_other_routes_are_untouched(make_proxy: ProxyFactory, backend: Backend) -> None:
    client = await make_proxy(config({"backend": "memory"}, url="{backend}"), backend)
    resp = await client.get("/v1/models")
    assert resp.status == 200
    assert "X-Session-Id" not in resp.headers
    assert "X-Session-Id" not in backend.seen[-1].headers


async def test_conversations_opening_with_the_same_greeting_stay_apart(
    make_proxy: ProxyFactory, sqlite_store: dict[str, Any]
) -> None:
    """A voice agent sends its greeting as the first assistant message of every call."""
    client = await make_proxy(config(sqlite_store))
    system = {"role": "system", "content": "You are a receptionist."}
    greeting = {"role": "assistant", "content": "Hello, thanks for calling!"}
    calls: dict[str, list[dict[str, Any]]] = {}
    for caller in ("first caller", "second caller"):
        history = [system, greeting, user(f"I am the {caller}")]
        sid, doc = await chat(client, history)
        calls[sid] = [*history, doc["choices"][0]["message"]]
    assert len(calls) == 2
    for sid, history in calls.items():
        again, _ = await chat(client, [*history, user("what next?")])
        assert again == sid
        status, session = await fetch(client, sid)
        assert session["turn_count"] == 2
        assert session["turns"][0]["messages"] == history[:3]


async def test_reply_sent_back_as_content_parts_or_another_choice(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    backend.chat(json_handler({
        "id": "c", "object": "chat.completion", "created": 1, "model": "test-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Option A"}, "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "content": "Option B"}, "finish_reason": "stop"},
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8},
    }))  # fmt: skip
    client = await make_proxy(config({"backend": "memory"}, url="{backend}"), backend)
    history = [user("Give me two options")]
    sid, _ = await chat(client, history, n=2)
    # the client keeps the second choice, as content parts
    history += [
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "Option"}, {"type": "text", "text": "B"}],
        },
        {"role": "user", "content": [{"type": "text", "text": "B please"}]},
    ]
    again, _ = await chat(client, history)
    assert again == sid
    status, session = await fetch(client, sid)
    assert session["turns"][0]["response"]["content"] == "Option A"
    assert session["turns"][1]["messages"] == [history[-1]]
