"""chat-proxy in front of the real llama.cpp backend (llama-cpp-python 0.3.36).

What a client of the proxy sees, with plain HTTP (aiohttp, as curl would): content,
usage, finish_reason and ``data: [DONE]``, streamed and not, through the raw relay
and through the transformed relay; model_override; llama's own errors; and the whole
chain (auth, rate_limit, validate, session on SQLite, model_override, tool_keywords)
carrying a three-turn streamed conversation as one session.

The backend's facts these tests rely on (see test_llama_direct.py): replies always
end with ``finish_reason: "length"`` (the tiny model never emits EOS), ``model``
echoes the request, greedy decoding (temperature 0) is deterministic, and streams
never carry a usage chunk, even with ``stream_options.include_usage``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

try:
    from .llama_server import LlamaBackend
except ImportError:
    from llama_server import LlamaBackend

from tests.fixtures import ProxyFactory

Client = Any  # aiohttp TestClient of the proxy
MAX_TOKENS = 12
CHAT = "/v1/chat/completions"

LLAMA = """
upstreams:
  - name: llama
    url: {llama}
    models: ["*"]
    timeouts: {connect: 2, first_byte: 20, idle: 20}
"""


def sse_payloads(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, in order (comments dropped)."""
    payloads: list[str] = []
    for event in raw.decode("utf-8").replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].lstrip(" ") for line in event.split("\n") if line.startswith("data:")]
        if data:
            payloads.append("\n".join(data))
    return payloads


def stream_chunks(raw: bytes) -> list[dict[str, Any]]:
    """The JSON chunks of a complete chat stream; asserts it ends with [DONE]."""
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    payloads = sse_payloads(raw)
    assert payloads[-1] == "[DONE]"
    assert "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


def streamed_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
    )


def body(model: str, text: str = "Say hello.", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a test."},
            {"role": "user", "content": text},
        ],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **extra,
    }


async def direct(backend: LlamaBackend, doc: dict[str, Any]) -> dict[str, Any]:
    """The same request sent straight to llama, non-streamed."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(f"{backend.base_url}/chat/completions", json=doc) as resp,
    ):
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


# -- plain relay ---------------------------------------------------------------------


async def test_non_streamed_reply_has_content_usage_and_finish_reason(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend
) -> None:
    client = await llama_proxy(LLAMA)
    resp = await client.post(CHAT, json=body(llama_backend.model))
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "application/json"
    assert resp.headers["x-upstream"] == "llama"
    assert resp.headers["X-Request-Id"]
    doc = await resp.json()
    assert doc["object"] == "chat.completion"
    assert doc["model"] == llama_backend.model
    [choice] = doc["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    usage = doc["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] == MAX_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # greedy decoding: the proxy relayed exactly what llama generates for this request
    same = await direct(llama_backend, body(llama_backend.model))
    assert choice["message"]["content"] == same["choices"][0]["message"]["content"]


async def test_streamed_reply_is_relayed_with_done_and_no_usage_chunk(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend
) -> None:
    client = await llama_proxy(LLAMA)
    doc = body(llama_backend.model, stream=True, stream_options={"include_usage": True})
    resp = await client.post(CHAT, json=doc)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    raw = await resp.read()
    chunks = stream_chunks(raw)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len({c["id"] for c in chunks}) == 1
    # the client asked for usage, the backend ignores include_usage, and the proxy does
    # not invent a usage chunk: the client gets none
    assert not any("usage" in c for c in chunks)
    same = await direct(llama_backend, body(llama_backend.model))
    assert streamed_text(chunks) == same["choices"][0]["message"]["content"]


async def test_transformed_relay_keeps_llamas_events(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend
) -> None:
    # session parses the stream to record the reply: events are re-emitted unchanged
    client = await llama_proxy(LLAMA + "middleware:\n  - type: session\n")
    doc = body(llama_backend.model, stream=True)
    resp = await client.post(CHAT, json=doc)
    assert resp.status == 200
    raw = await resp.read()
    chunks = stream_chunks(raw)
    # llama's own json.dumps spacing survives: unchanged events keep their bytes
    assert raw.startswith(b'data: {"id": "chatcmpl-')
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    same = await direct(llama_backend, body(llama_backend.model))
    assert streamed_text(chunks) == same["choices"][0]["message"]["content"]
    sid = resp.headers["X-Session-Id"]
    session = await (await client.get(f"/v1/sessions/{sid}")).json()
    [turn] = session["turns"]
    assert turn["response"]["content"] == streamed_text(chunks)
    assert turn["finish_reason"] == "length"
    # llama sends no usage in streams, so the recorded turn has none
    assert turn["usage"] is None
    assert session["usage"]["total_tokens"] == 0


async def test_non_streamed_session_turn_records_llamas_usage(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend
) -> None:
    client = await llama_proxy(LLAMA + "middleware:\n  - type: session\n")
    resp = await client.post(CHAT, json=body(llama_backend.model))
    usage = (await resp.json())["usage"]
    session = await (await client.get(f"/v1/sessions/{resp.headers['X-Session-Id']}")).json()
    assert session["turns"][0]["usage"] == usage
    assert session["usage"] == usage


# -- model_override --------------------------------------------------------------------

OVERRIDE = """
upstreams:
  - name: llama
    url: {llama}
    models: ["{llama_model}"]     # only the real name is routed
    timeouts: {connect: 2, first_byte: 20, idle: 20}
middleware:
  - type: model_override
    aliases: {junis-orchestrator: "{llama_model}"}
    report_model: REPORT
"""


@pytest.mark.parametrize("stream", [False, True])
async def test_alias_reaches_llama_under_its_real_name(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend, stream: bool
) -> None:
    client = await llama_proxy(OVERRIDE.replace("REPORT", "backend"))
    resp = await client.post(CHAT, json=body("junis-orchestrator", stream=stream))
    assert resp.status == 200, await resp.text()
    # llama echoes the model it received
    if stream:
        models = {c["model"] for c in stream_chunks(await resp.read())}
        assert models == {llama_backend.model}
    else:
        assert (await resp.json())["model"] == llama_backend.model


@pytest.mark.parametrize("stream", [False, True])
async def test_report_model_requested_shows_the_clients_name(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend, stream: bool
) -> None:
    client = await llama_proxy(OVERRIDE.replace("REPORT", "requested"))
    resp = await client.post(CHAT, json=body("junis-orchestrator", stream=stream))
    assert resp.status == 200, await resp.text()
    if stream:
        chunks = stream_chunks(await resp.read())
        assert {c["model"] for c in chunks} == {"junis-orchestrator"}
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    else:
        doc = await resp.json()
        assert doc["model"] == "junis-orchestrator"
        assert doc["usage"]["completion_tokens"] == MAX_TOKENS


async def test_without_the_alias_the_name_is_not_routed(llama_proxy: ProxyFactory) -> None:
    client = await llama_proxy(OVERRIDE.replace("REPORT", "backend"))
    resp = await client.post(CHAT, json=body("gpt-4o"))
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "model_not_found"


async def test_forced_model_is_what_llama_receives(llama_proxy: ProxyFactory) -> None:
    client = await llama_proxy(
        LLAMA + "middleware:\n  - type: model_override\n    model: forced-by-proxy\n"
    )
    for sent in ("gpt-4o", "junis-orchestrator"):
        resp = await client.post(CHAT, json=body(sent))
        assert (await resp.json())["model"] == "forced-by-proxy"
    no_model = body("x")
    del no_model["model"]
    resp = await client.post(CHAT, json=no_model)
    assert (await resp.json())["model"] == "forced-by-proxy"


# -- llama's errors through the proxy ------------------------------------------------

# ~4800 tokens with the tiny model's vocabulary: over its n_ctx of 512
OVERLONG = "hello world " * 400


async def test_overlong_prompt_is_llamas_400_unstreamed(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend
) -> None:
    client = await llama_proxy(LLAMA)
    resp = await client.post(CHAT, json=body(llama_backend.model, OVERLONG))
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"
    assert "maximum context length is 512 tokens" in error["message"]


async def test_overlong_prompt_streamed_is_a_502_not_an_empty_200(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend
) -> None:
    # llama answers 200 text/event-stream with an empty body; the client gets a JSON 502
    client = await llama_proxy(LLAMA)
    resp = await client.post(CHAT, json=body(llama_backend.model, OVERLONG, stream=True))
    assert resp.status == 502
    assert resp.content_type == "application/json"
    error = (await resp.json())["error"]
    assert error == {
        "message": "The backend ended the stream without sending anything.",
        "type": "api_error",
        "param": None,
        "code": "upstream_empty",
    }
    # llama closes that connection next, after the proxy's pool took it back (the empty
    # body was complete): the very next request must still succeed (the proxy drops
    # that connection, and a request that meets a connection closed under it is sent
    # once more at once)
    for _ in range(3):
        resp = await client.post(CHAT, json=body(llama_backend.model))
        assert resp.status == 200, await resp.text()


async def test_llamas_500_for_a_bad_type_becomes_a_502(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend
) -> None:
    # without validate, llama itself refuses max_tokens "lots" with a 500
    client = await llama_proxy(LLAMA)
    resp = await client.post(CHAT, json=body(llama_backend.model, max_tokens="lots"))
    assert resp.status == 502
    text = await resp.text()
    assert "Traceback" not in text and ".py" not in text  # llama's message quotes its traceback
    error = json.loads(text)["error"]
    assert error["type"] == "api_error"
    assert error["message"] == "The backend failed (status 500)."


async def test_validate_refuses_the_bad_type_before_llama(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend
) -> None:
    client = await llama_proxy(LLAMA + "middleware:\n  - type: validate\n")
    resp = await client.post(CHAT, json=body(llama_backend.model, max_tokens="lots"))
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "max_tokens"
    assert error["type"] == "invalid_request_error"


# -- the whole chain -----------------------------------------------------------------

KEY = "sk-e2e-chain-0123456789"

CHAIN = """
upstreams:
  - name: llama
    url: {llama}
    models: ["{llama_model}"]
    timeouts: {connect: 2, first_byte: 20, idle: 20}
store:
  backend: sqlite
  path: DB_PATH
middleware:
  - type: auth
    keys:
      - id: voice-agent
        key: ${CHAIN_KEY}
        scopes: [chat, models, sessions:read]
        models: ["{llama_model}"]
  - type: rate_limit
    requests_per_minute: 100
    tokens_per_minute: 100000
    max_concurrent: 4
  - type: validate
    max_n: 1
  - type: session
  - type: model_override
    aliases: {junis-orchestrator: "{llama_model}"}
    report_model: requested
  - type: tool_keywords
    rules:
      - tool: end_call
        pattern: '[a-z]'            # any reply of the tiny model: its text is random
        arguments: {reason: "the caller said goodbye"}
"""

END_CALL = {
    "type": "function",
    "function": {
        "name": "end_call",
        "description": "End the call.",
        "parameters": {
            "type": "object",
            "properties": {"reason": {"type": "string"}},
            "required": ["reason"],
        },
    },
}


async def streamed_turn(
    client: Client, messages: list[dict[str, Any]], **extra: Any
) -> tuple[aiohttp.ClientResponse, list[dict[str, Any]]]:
    resp = await client.post(
        CHAT,
        json={
            "model": "junis-orchestrator",
            "messages": messages,
            "max_tokens": MAX_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
            **extra,
        },
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert resp.status == 200, await resp.text()
    return resp, stream_chunks(await resp.read())


async def test_full_chain_three_streamed_turns_are_one_session(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend, tmp_path: Path
) -> None:
    db = tmp_path / "sessions.db"
    client = await llama_proxy(CHAIN.replace("DB_PATH", str(db)), env={"CHAIN_KEY": KEY})
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a voice agent."},
        {"role": "user", "content": "Hello, who is this?"},
    ]

    # turn 1: plain text
    resp, chunks = await streamed_turn(client, messages)
    sid = resp.headers["X-Session-Id"]
    assert sid.startswith("sess_")
    assert int(resp.headers["x-ratelimit-remaining-requests"]) < 100
    assert {c["model"] for c in chunks} == {"junis-orchestrator"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    first = streamed_text(chunks)
    assert first
    messages += [
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Can you help me?"},
    ]

    # turn 2: the end_call tool is declared, so tool_keywords turns the reply into a call
    resp, chunks = await streamed_turn(client, messages, tools=[END_CALL], tool_choice="auto")
    assert resp.headers["X-Session-Id"] == sid
    second = streamed_text(chunks)
    assert second
    calls = [
        call
        for c in chunks
        for choice in c["choices"]
        for call in choice["delta"].get("tool_calls") or ()
    ]
    [call] = calls
    assert call["function"]["name"] == "end_call"
    assert json.loads(call["function"]["arguments"]) == {"reason": "the caller said goodbye"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # the tool-call chunk comes just before the final chunk
    assert chunks[-2]["choices"][0]["delta"].get("tool_calls")
    messages += [
        {
            "role": "assistant",
            "content": second,
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": "end_call", "arguments": call["function"]["arguments"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call["id"], "content": "not ended"},
        {"role": "user", "content": "Wait, one more thing."},
    ]

    # turn 3: continues after the tool call
    resp, chunks = await streamed_turn(client, messages)
    assert resp.headers["X-Session-Id"] == sid
    third = streamed_text(chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    auth = {"Authorization": f"Bearer {KEY}"}
    listing = await (await client.get("/v1/sessions", headers=auth)).json()
    assert [s["id"] for s in listing["data"]] == [sid]
    session = await (await client.get(f"/v1/sessions/{sid}", headers=auth)).json()
    assert session["turn_count"] == 3
    assert session["key_id"] == "voice-agent"
    assert session["source"] in ("new", "continued")  # how its latest turn was matched
    turns = session["turns"]
    assert [t["response"]["content"] for t in turns] == [first, second, third]
    assert [t["finish_reason"] for t in turns] == ["length", "tool_calls", "length"]
    assert turns[1]["response"]["tool_calls"][0]["function"]["name"] == "end_call"
    # the turn records the model the backend served (the alias is only what clients see)
    assert {t["model"] for t in turns} <= {llama_backend.model, "junis-orchestrator"}
    assert db.exists()


async def test_request_ids_reach_llama_in_a_form_it_accepts(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend
) -> None:
    # llama-cpp-python refuses an X-Request-Id that does not parse as a UUID (an empty
    # 400); the proxy's own ids (req_ + 32 hex digits) go upstream as the bare hex
    client = await llama_proxy(LLAMA)
    resp = await client.post(CHAT, json=body(llama_backend.model))
    assert resp.status == 200, await resp.text()
    assert resp.headers["X-Request-Id"].startswith("req_")
    rid = "6a93da64-5f31-4c8e-9d6b-0123456789ab"
    resp = await client.post(CHAT, json=body(llama_backend.model), headers={"X-Request-Id": rid})
    assert resp.status == 200, await resp.text()
    assert resp.headers["X-Request-Id"] == rid
    # a client's own id is forwarded as it came, so one llama cannot parse is refused
    resp = await client.post(
        CHAT, json=body(llama_backend.model), headers={"X-Request-Id": "trace-1"}
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["message"] == "The backend answered with status 400."
