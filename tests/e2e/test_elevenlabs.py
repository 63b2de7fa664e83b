"""ElevenLabs "custom LLM" requests through the proxy.

ElevenLabs' agents platform calls a custom LLM's /v1/chat/completions with an OpenAI
request that always streams, asks for usage, declares its system tools (end_call
among them), turns parallel tool calls off, and adds two fields of its own:
`user_id` and, with "Custom LLM extra body" on, `elevenlabs_extra_body` (carrying the
conversation id). Checked against a scripted stand-in that records what it received,
and against the real llama.cpp server.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from aiohttp import web

try:
    from .llama_server import LlamaBackend
except ImportError:
    from llama_server import LlamaBackend

from proxy.sessions.ids import forwarded_id
from tests.fixtures import DONE, Backend, ProxyFactory, chunk, sse_handler, usage_chunk

Client = Any
CHAT = "/v1/chat/completions"
CONVERSATION = "conv_01jx7e2q4k9f8m3n5p6r7s8t9v"

END_CALL = {
    "type": "function",
    "function": {
        "name": "end_call",
        "description": "Call this function to end the call when the user says goodbye "
        "or the task is complete.",
        "parameters": {
            "type": "object",
            "properties": {"reason": {"type": "string", "description": "Why the call is ending."}},
            "required": ["reason"],
        },
    },
}

ELEVENLABS_REQUEST: dict[str, Any] = {
    "model": "junis-orchestrator",
    "messages": [
        {
            "role": "system",
            "content": "You are Junis, a friendly voice assistant. Keep answers short.",
        },
        {"role": "assistant", "content": "Hi, this is Junis. How can I help you today?"},
        {"role": "user", "content": "I just wanted to check my order. Thanks, goodbye!"},
    ],
    "temperature": 0.5,
    "max_tokens": 16,
    "stream": True,
    "stream_options": {"include_usage": True},
    "tools": [END_CALL],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "user_id": "user_8f3k2m",
    "elevenlabs_extra_body": {
        "conversation_id": CONVERSATION,
        "agent_id": "agent_01jx7d0w5b",
        "customer": {"tier": "gold"},
    },
}

CHAIN = """
upstreams:
  - name: main
    url: URL
    models: ["MODEL"]
    timeouts: {connect: 2, first_byte: 20, idle: 20}
middleware:
  - type: validate
  - type: session
  - type: model_override
    aliases: {junis-orchestrator: "MODEL"}
  - type: tool_keywords
    rules:
      - tool: end_call
        keywords: [goodbye, "talk to you later"]
        arguments: {reason: "the caller said goodbye"}
"""


def chain(url: str, model: str) -> str:
    return CHAIN.replace("URL", url).replace("MODEL", model)


def elevenlabs_request(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(ELEVENLABS_REQUEST)
    doc.update(changes)
    return doc


def payloads(raw: bytes) -> list[str]:
    out: list[str] = []
    for event in raw.decode("utf-8").split("\n\n"):
        data = [line[5:].lstrip(" ") for line in event.split("\n") if line.startswith("data:")]
        if data:
            out.append("\n".join(data))
    return out


def chunks_of(raw: bytes) -> list[dict[str, Any]]:
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-300:]
    got = payloads(raw)
    assert got[-1] == "[DONE]" and "[DONE]" not in got[:-1]
    return [json.loads(p) for p in got[:-1]]


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
    )


def tool_calls_of(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        call
        for c in chunks
        for ch in c.get("choices") or ()
        for call in ch["delta"].get("tool_calls") or ()
    ]


REPLY = (
    chunk(role="assistant", content="", model="llama3.1:8b"),
    chunk("You're welcome, ", model="llama3.1:8b"),
    chunk("good", model="llama3.1:8b"),
    chunk("bye!", model="llama3.1:8b"),
    chunk(finish="stop", model="llama3.1:8b"),
    usage_chunk(40, 6, model="llama3.1:8b"),
    DONE,
)


async def post(client: Client, doc: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    resp = await client.post(CHAT, json=doc)
    assert resp.status == 200, await resp.text()
    return resp, chunks_of(await resp.read())


# -- a stand-in that records the request -----------------------------------------------


async def test_request_as_the_backend_receives_it(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    backend.chat(sse_handler(*REPLY))
    client = await make_proxy(chain("{backend}", "llama3.1:8b"), backend)
    resp, chunks = await post(client, elevenlabs_request())

    [seen] = backend.seen
    sent = seen.json()
    expected = elevenlabs_request(model="llama3.1:8b", user="user_8f3k2m")
    del expected["elevenlabs_extra_body"], expected["user_id"]
    assert sent == expected  # nothing else changed: tools, stream_options, temperature...
    # the backend gets the conversation as an id of this caller's own (another caller
    # naming the same conversation id reaches it as another session)
    assert seen.headers["X-Session-Id"] == forwarded_id("ip:127.0.0.1", CONVERSATION)
    assert seen.headers["X-Session-Id"] != CONVERSATION
    assert resp.headers["X-Session-Id"] == CONVERSATION
    assert resp.headers["Content-Type"] == "text/event-stream"

    # the reply: text as it came, then end_call from the keyword, usage, [DONE]
    assert text_of(chunks) == "You're welcome, goodbye!"
    [call] = tool_calls_of(chunks)
    assert call["function"]["name"] == "end_call"
    assert json.loads(call["function"]["arguments"]) == {"reason": "the caller said goodbye"}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 46


async def test_the_conversation_id_keeps_one_session(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    backend.chat(sse_handler(*REPLY))
    client = await make_proxy(chain("{backend}", "llama3.1:8b"), backend)
    first = elevenlabs_request()
    resp, chunks = await post(client, first)
    history = [
        *first["messages"],
        {"role": "assistant", "content": text_of(chunks)},
        {"role": "user", "content": "Oh wait, one more question."},
    ]
    resp, _ = await post(client, elevenlabs_request(messages=history))
    assert resp.headers["X-Session-Id"] == CONVERSATION
    session = await (await client.get(f"/v1/sessions/{CONVERSATION}")).json()
    assert session["source"] == "elevenlabs"
    assert session["turn_count"] == 2
    assert session["usage"]["total_tokens"] == 2 * 46
    # the first turn keeps the whole opening context, system prompt and greeting too
    assert session["turns"][0]["messages"] == first["messages"]
    assert session["turns"][0]["response"]["tool_calls"][0]["function"]["name"] == "end_call"


@pytest.mark.parametrize("middleware", ["[]", "[{type: validate}]"])
async def test_without_session_the_extra_body_is_still_not_forwarded(
    make_proxy: ProxyFactory, backend: Backend, middleware: str
) -> None:
    backend.chat(sse_handler(*REPLY))
    text = f"""
upstreams:
  - name: main
    url: {{backend}}
middleware: {middleware}
"""
    client = await make_proxy(text, backend)
    resp, chunks = await post(client, elevenlabs_request())
    sent = backend.seen[-1].json()
    assert "elevenlabs_extra_body" not in sent
    assert "user_id" not in sent
    assert sent["user"] == "user_8f3k2m"
    assert "X-Session-Id" not in resp.headers
    assert "X-Session-Id" not in backend.seen[-1].headers
    assert text_of(chunks) == "You're welcome, goodbye!"  # no rewrite without tool_keywords


async def test_a_backend_error_reaches_elevenlabs_as_an_openai_error(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "model 'llama3.1:8b' not found"}, status=404)

    backend.chat(refuse)
    client = await make_proxy(chain("{backend}", "llama3.1:8b"), backend)
    resp = await client.post(CHAT, json=elevenlabs_request())
    assert resp.status == 404
    assert resp.headers["X-Session-Id"] == CONVERSATION
    error = (await resp.json())["error"]
    assert error["message"] == "model 'llama3.1:8b' not found"
    assert error["type"] == "invalid_request_error"


# -- the real llama.cpp server ---------------------------------------------------------


async def test_elevenlabs_request_against_llama(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend
) -> None:
    client = await llama_proxy(chain("{llama}", "{llama_model}"))
    first = elevenlabs_request()
    resp, chunks = await post(client, first)
    assert resp.headers["X-Session-Id"] == CONVERSATION
    assert {c["model"] for c in chunks} == {llama_backend.model}
    reply = text_of(chunks)
    assert reply
    # the tiny model's random text holds no "goodbye": a plain reply cut at max_tokens
    assert tool_calls_of(chunks) == []
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert not any("usage" in c for c in chunks)  # llama ignores include_usage

    history = [
        *first["messages"],
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And when will it arrive?"},
    ]
    resp, chunks = await post(client, elevenlabs_request(messages=history))
    assert resp.headers["X-Session-Id"] == CONVERSATION
    assert text_of(chunks)
    session = await (await client.get(f"/v1/sessions/{CONVERSATION}")).json()
    assert session["source"] == "elevenlabs"
    assert session["turn_count"] == 2
    assert [t["response"]["content"] for t in session["turns"]] == [reply, text_of(chunks)]
