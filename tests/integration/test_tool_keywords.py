"""Tool calls from keywords: replies that say a rule's keyword become tool calls."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import re
import sys
from typing import Any

import openai
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from proxy import chain, sse
from proxy.config import ConfigError
from proxy.middleware import tool_keywords
from tests.fixtures import BASIC, Backend, ProxyFactory, chat_body, config_from, json_handler

CONFIG = (
    BASIC
    + r"""
middleware:
  - type: tool_keywords
    rules:
      - tool: end_call
        keywords: [goodbye, bye, "talk to you later"]
        arguments: {reason: "the conversation is over"}
      - tool: transfer_to_agent
        pattern: '\btransfer(ring)? you\b'
        arguments: {agent_number: 1, note: "heard {match}", nested: ["{match}", 2]}
"""
)

END_CALL = {
    "type": "function",
    "function": {
        "name": "end_call",
        "description": "End the call when the conversation is over.",
        "parameters": {
            "type": "object",
            "properties": {"reason": {"type": "string"}},
            "required": ["reason"],
        },
    },
}
TRANSFER = {
    "type": "function",
    "function": {
        "name": "transfer_to_agent",
        "parameters": {"type": "object", "properties": {"agent_number": {"type": "integer"}}},
    },
}
TOOLS = [END_CALL, TRANSFER]
END_ARGS = {"reason": "the conversation is over"}
CALL_ID = re.compile(r"call_[A-Za-z0-9]{24}")


# --- a scripted backend's stream, written with real UTF-8 (not \u escapes) ------------


def event(
    content: str | None = None, *, index: int = 0, finish: str | None = None, **delta: Any
) -> bytes:
    d: dict[str, Any] = dict(delta)
    if content is not None:
        d["content"] = content
    doc = {
        "id": "chatcmpl-kw",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "test-model",
        "choices": [{"index": index, "delta": d, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(doc, ensure_ascii=False).encode() + b"\n\n"


USAGE = (
    b'data: {"id":"chatcmpl-kw","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"test-model","choices":[],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}\n\n'
)
DONE = b"data: [DONE]\n\n"


def reply_stream(deltas: list[str], finish: str = "stop") -> tuple[bytes, bytes, bytes]:
    """(the events up to the last content delta, the final chunk, usage and [DONE])."""
    head = event("", role="assistant") + b"".join(event(d) for d in deltas)
    return head, event(None, finish=finish), USAGE + DONE


class Script:
    """The stand-in backend's chat answer: byte parts written one by one; with
    `yields`, the event loop runs between writes so the proxy reads each part on its
    own."""

    def __init__(self, backend: Backend) -> None:
        self.parts: list[bytes] = []
        self.yields = 0
        backend.chat(self.handler)

    async def handler(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, part in enumerate(self.parts):
            for _ in range(self.yields if i else 0):
                await asyncio.sleep(0)  # lets the proxy read what was written so far
            await resp.write(part)
        await resp.write_eof()
        return resp


def events_of(raw: bytes) -> list[Any]:
    events, rest = sse.parse(sse.START, raw)
    assert rest.buf == b""
    return [e.data if e.data == "[DONE]" else e.json() for e in events]


def assemble(docs: list[Any]) -> dict[int, dict[str, Any]]:
    """What a client accumulating the deltas ends up with, per choice."""
    out: dict[int, dict[str, Any]] = {}
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        for c in doc.get("choices") or ():
            acc = out.setdefault(c["index"], {"content": "", "tool_calls": [], "finish": None})
            delta = c.get("delta") or {}
            acc["content"] += delta.get("content") or ""
            acc["tool_calls"].extend(delta.get("tool_calls") or ())
            if c.get("finish_reason"):
                acc["finish"] = c["finish_reason"]
    return out


def check_rewritten_stream(out: bytes, head: bytes, final: bytes, tail: bytes, text: str) -> None:
    """The content events unchanged byte for byte, then one tool call chunk, the final
    chunk with finish_reason tool_calls, and the usage chunk and [DONE] untouched."""
    assert out.startswith(head)
    assert out.endswith(tail)
    middle = events_of(out[len(head) : len(out) - len(tail)])
    assert len(middle) == 2
    call_chunk, last = middle
    original = events_of(final)[0]
    for key in ("id", "object", "created", "model"):
        assert call_chunk[key] == original[key]
    assert call_chunk["choices"] == [
        {
            "index": 0,
            "delta": {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": call_chunk["choices"][0]["delta"]["tool_calls"][0]["id"],
                        "type": "function",
                        "function": {"name": "end_call", "arguments": json.dumps(END_ARGS)},
                    }
                ]
            },
            "finish_reason": None,
        }
    ]
    assert CALL_ID.fullmatch(call_chunk["choices"][0]["delta"]["tool_calls"][0]["id"])
    assert last == {
        **original,
        "choices": [{**original["choices"][0], "finish_reason": "tool_calls"}],
    }
    got = assemble(events_of(out))[0]
    assert got["content"] == text
    assert got["finish"] == "tool_calls"


def stream_body(**extra: Any) -> dict[str, Any]:
    body = chat_body("Thanks, that is all.", stream=True, tools=TOOLS)
    body.update(extra)
    return body


# --- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "error"),
    [
        (
            "{tool: t, pattern: '(unclosed'}",
            "middleware[0].tool_keywords.rules[1].pattern: not a valid regular expression "
            "(missing ), unterminated subpattern at position 0)",
        ),
        (
            "{tool: t, pattern: 'a*'}",
            "middleware[0].tool_keywords.rules[1].pattern: matches the empty string",
        ),
        ("{tool: t}", "middleware[0].tool_keywords.rules[1]: give either keywords or pattern"),
        (
            "{tool: t, keywords: [a], pattern: b}",
            "middleware[0].tool_keywords.rules[1]: give either keywords or pattern",
        ),
        (
            "{tool: t, keywords: []}",
            "middleware[0].tool_keywords.rules[1].keywords: must not be empty",
        ),
        (
            "{tool: t, keywords: ['  ']}",
            "middleware[0].tool_keywords.rules[1].keywords: a keyword must not be blank",
        ),
        (
            "{tool: t, keywords: [a], arguments: [1]}",
            "middleware[0].tool_keywords.rules[1].arguments: must be a mapping",
        ),
        (
            "{tool: '', keywords: [a]}",
            "middleware[0].tool_keywords.rules[1].tool: must not be empty",
        ),
        (
            "{tool: t, keywords: [a], extra: 1}",
            "middleware[0].tool_keywords.rules[1].extra: unknown key",
        ),
    ],
)
def test_bad_rules_are_config_errors_with_their_path(rule: str, error: str) -> None:
    text = (
        BASIC
        + f"""
middleware:
  - type: tool_keywords
    rules:
      - {{tool: ok, keywords: [fine]}}
      - {rule}
"""
    )
    with pytest.raises(ConfigError) as info:
        config_from(text.replace("{backend}", "http://127.0.0.1:9"))
    assert any(line.startswith(error) for line in info.value.errors), info.value.errors


def test_rules_must_not_be_empty() -> None:
    with pytest.raises(ConfigError) as info:
        config_from(
            BASIC.replace("{backend}", "http://127.0.0.1:9")
            + "middleware: [{type: tool_keywords, rules: []}]"
        )
    assert info.value.errors == ["middleware[0].tool_keywords.rules: must not be empty"]


# --- not streaming ----------------------------------------------------------------------


async def post(client: Any, body: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    doc: dict[str, Any] = await resp.json()
    return doc


def answer(backend: Backend, *contents: str, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": "chatcmpl-kw",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "test-model",
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": c}, "finish_reason": "stop"}
            for i, c in enumerate(contents)
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
    }
    doc.update(extra)
    backend.chat(json_handler(doc))
    return doc


async def test_reply_with_keyword_becomes_a_tool_call(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    sent = answer(backend, "Thanks for calling, goodbye!")
    client = await make_proxy(CONFIG, backend)
    doc = await post(client, chat_body("that's all", tools=TOOLS))
    choice = doc["choices"][0]
    call = choice["message"]["tool_calls"][0]
    assert CALL_ID.fullmatch(call["id"])
    assert choice == {
        "index": 0,
        "message": {
            "role": "assistant",
            "content": "Thanks for calling, goodbye!",
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": "end_call", "arguments": call["function"]["arguments"]},
                }
            ],
        },
        "finish_reason": "tool_calls",
    }
    assert json.loads(call["function"]["arguments"]) == END_ARGS
    assert {k: v for k, v in doc.items() if k != "choices"} == {
        k: v for k, v in sent.items() if k != "choices"
    }


@pytest.mark.parametrize(
    ("text", "tool"),
    [
        ("GoodBye then.", "end_call"),
        ("bye", "end_call"),
        ("Okay. BYE!", "end_call"),
        ("(bye)", "end_call"),
        ("Maybe later.", None),
        ("byebye", None),
        ("goodbyes are hard", None),
        ("a goodbye_note", None),
        ("Talk to you later!", "end_call"),
        ("talk  to\n you\tlater", "end_call"),
        ("talk to your later", None),
        ("talkto you later", None),
        ("I'll transfer you now", "transfer_to_agent"),
        ("TRANSFERRING YOU", "transfer_to_agent"),
        ("transferring your call", None),
        ("", None),
    ],
)
async def test_keywords_are_case_insensitive_whole_words(
    make_proxy: ProxyFactory, backend: Backend, text: str, tool: str | None
) -> None:
    answer(backend, text)
    client = await make_proxy(CONFIG, backend)
    choice = (await post(client, chat_body(tools=TOOLS)))["choices"][0]
    assert choice["message"]["content"] == text
    if tool is None:
        assert "tool_calls" not in choice["message"]
        assert choice["finish_reason"] == "stop"
    else:
        assert choice["message"]["tool_calls"][0]["function"]["name"] == tool
        assert choice["finish_reason"] == "tool_calls"


async def test_match_placeholder_fills_string_arguments(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    answer(backend, "Please hold while I am Transferring You.")
    client = await make_proxy(CONFIG, backend)
    choice = (await post(client, chat_body(tools=TOOLS)))["choices"][0]
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "transfer_to_agent"
    assert json.loads(call["function"]["arguments"]) == {
        "agent_number": 1,
        "note": "heard Transferring You",
        "nested": ["Transferring You", 2],
    }


async def test_first_rule_in_file_order_wins(make_proxy: ProxyFactory, backend: Backend) -> None:
    # "transfer you" comes first in the text, but end_call is the first rule
    answer(backend, "I could transfer you, but goodbye.")
    client = await make_proxy(CONFIG, backend)
    choice = (await post(client, chat_body(tools=TOOLS)))["choices"][0]
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["end_call"]


@pytest.mark.parametrize(
    ("tools", "tool_choice", "expected"),
    [
        (TOOLS, None, "end_call"),
        (TOOLS, "auto", "end_call"),
        (TOOLS, "required", "end_call"),
        ([END_CALL], "auto", "end_call"),
        (TOOLS, "none", None),
        (None, None, None),
        ([TRANSFER], "auto", "transfer_to_agent"),
        ([{"type": "function", "function": {"name": "other"}}], "auto", None),
        (TOOLS, {"type": "function", "function": {"name": "end_call"}}, "end_call"),
        # a named function other than the rule's tool: the transfer rule fires instead
        (
            TOOLS,
            {"type": "function", "function": {"name": "transfer_to_agent"}},
            "transfer_to_agent",
        ),
        ([END_CALL], {"type": "function", "function": {"name": "transfer_to_agent"}}, None),
        (
            TOOLS,
            {
                "type": "allowed_tools",
                "allowed_tools": {
                    "mode": "auto",
                    "tools": [{"type": "function", "function": {"name": "transfer_to_agent"}}],
                },
            },
            "transfer_to_agent",
        ),
    ],
)
async def test_fires_only_for_declared_tools_that_tool_choice_allows(
    make_proxy: ProxyFactory,
    backend: Backend,
    tools: list[Any] | None,
    tool_choice: Any,
    expected: str | None,
) -> None:
    raw = json.dumps(answer(backend, "Goodbye, or shall I transfer you?")).encode()

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=raw, content_type="application/json")

    backend.chat(handler)
    client = await make_proxy(CONFIG, backend)
    extra: dict[str, Any] = {}
    if tools is not None:
        extra["tools"] = tools
    if tool_choice is not None:
        extra["tool_choice"] = tool_choice
    resp = await client.post("/v1/chat/completions", json=chat_body(**extra))
    body = await resp.read()
    if expected is None:
        assert body == raw  # untouched, byte for byte
    else:
        choice = json.loads(body)["choices"][0]
        assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == [expected]
        assert choice["finish_reason"] == "tool_calls"


async def test_each_choice_on_its_own(make_proxy: ProxyFactory, backend: Backend) -> None:
    answer(backend, "Goodbye!", "Anything else?", "Transferring you now.")
    client = await make_proxy(CONFIG, backend)
    choices = (await post(client, chat_body(tools=TOOLS, n=3)))["choices"]
    assert [c["finish_reason"] for c in choices] == ["tool_calls", "stop", "tool_calls"]
    assert choices[0]["message"]["tool_calls"][0]["function"]["name"] == "end_call"
    assert "tool_calls" not in choices[1]["message"]
    assert choices[2]["message"]["tool_calls"][0]["function"]["name"] == "transfer_to_agent"
    assert (
        choices[0]["message"]["tool_calls"][0]["id"] != choices[2]["message"]["tool_calls"][0]["id"]
    )


async def test_native_tool_calls_are_left_alone(make_proxy: ProxyFactory, backend: Backend) -> None:
    native = {
        "id": "call_native",
        "type": "function",
        "function": {"name": "lookup", "arguments": "{}"},
    }
    doc = answer(backend, "Goodbye.")
    doc["choices"][0]["message"]["tool_calls"] = [native]
    doc["choices"][0]["finish_reason"] = "tool_calls"
    backend.chat(json_handler(doc))
    client = await make_proxy(CONFIG, backend)
    assert await post(client, chat_body(tools=TOOLS)) == doc


def rewritten(tool: str) -> float:
    value = REGISTRY.get_sample_value("chat_proxy_tool_calls_rewritten_total", {"tool": tool})
    return value or 0.0


async def test_rewrites_are_counted_in_log_and_metrics(
    make_proxy: ProxyFactory, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    answer(backend, "Goodbye!", "transfer you", "bye")
    client = await make_proxy(CONFIG, backend)
    before = rewritten("end_call"), rewritten("transfer_to_agent")
    caplog.set_level(logging.INFO, logger="chat_proxy.access")
    await post(client, chat_body(tools=TOOLS, n=3))
    assert (rewritten("end_call"), rewritten("transfer_to_agent")) == (before[0] + 2, before[1] + 1)
    lines = [r for r in caplog.records if r.name == "chat_proxy.access"]
    assert lines[-1].__dict__["tool_calls_rewritten"] == {"end_call": 2, "transfer_to_agent": 1}


def test_loading_the_module_twice_keeps_one_counter() -> None:
    saved = chain._REGISTRY["tool_keywords"]
    try:
        spec = importlib.util.spec_from_file_location("tool_keywords_again", tool_keywords.__file__)
        assert spec is not None and spec.loader is not None
        again = importlib.util.module_from_spec(spec)
        sys.modules["tool_keywords_again"] = again
        spec.loader.exec_module(again)
        assert again.REWRITTEN is tool_keywords.REWRITTEN
    finally:
        sys.modules.pop("tool_keywords_again", None)
        chain._REGISTRY["tool_keywords"] = saved


# --- streaming --------------------------------------------------------------------------

TEXTS = [
    "goodbye",
    "¡adiós, goodbye!",
    "Okay, talk to you later",
    "Talk to\nyou later, friend. Bye",
]


@pytest.mark.parametrize("text", TEXTS)
async def test_stream_keyword_across_every_delta_boundary(
    make_proxy: ProxyFactory, backend: Backend, text: str
) -> None:
    script = Script(backend)
    client = await make_proxy(CONFIG, backend)
    splits = [[text[:k], text[k:]] for k in range(1, len(text))] + [list(text), [text]]
    for deltas in splits:
        head, final, tail = reply_stream(deltas)
        script.parts = [head, final, tail]
        resp = await client.post("/v1/chat/completions", json=stream_body())
        assert resp.status == 200
        check_rewritten_stream(await resp.read(), head, final, tail, text)


@pytest.mark.parametrize(
    "text", ["Maybe later.", "goodbyes all round", "talk to you laterally", "bye_bye"]
)
async def test_stream_without_whole_keyword_is_untouched_at_every_boundary(
    make_proxy: ProxyFactory, backend: Backend, text: str
) -> None:
    script = Script(backend)
    client = await make_proxy(CONFIG, backend)
    for k in range(1, len(text)):
        head, final, tail = reply_stream([text[:k], text[k:]])
        script.parts = [head, final, tail]
        resp = await client.post("/v1/chat/completions", json=stream_body())
        assert await resp.read() == head + final + tail


async def test_stream_sse_bytes_split_at_every_offset(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    text = "¡adiós, goodbye!"
    head, final, tail = reply_stream(["¡adiós, good", "bye!"])
    whole = head + final + tail
    script = Script(backend)
    script.yields = 4
    client = await make_proxy(CONFIG, backend)
    # every offset at once: one byte per write
    script.parts = [whole[i : i + 1] for i in range(len(whole))]
    resp = await client.post("/v1/chat/completions", json=stream_body())
    check_rewritten_stream(await resp.read(), head, final, tail, text)
    # two writes, split at each offset of the content events (from the one before them
    # to the final chunk): inside "¡", "ó", the JSON, the keyword and the line ends
    start = len(event("", role="assistant")) - 3
    offsets = range(start, len(head) + 3)
    assert any(whole[i] & 0xC0 == 0x80 for i in offsets)  # inside a multi-byte character
    for offset in offsets:
        script.parts = [whole[:offset], whole[offset:]]
        resp = await client.post("/v1/chat/completions", json=stream_body())
        check_rewritten_stream(await resp.read(), head, final, tail, text)


async def test_stream_with_crlf_lines_and_the_keyword_in_the_final_chunk(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    head = event("", role="assistant").replace(b"\n", b"\r\n") + event("See you. Good")
    final = event("bye", finish="stop").replace(b"\n", b"\r\n")
    script = Script(backend)
    script.parts = [head, final, USAGE + DONE]
    client = await make_proxy(CONFIG, backend)
    resp = await client.post("/v1/chat/completions", json=stream_body())
    out = await resp.read()
    assert out.startswith(head)
    assert out.endswith(USAGE + DONE)
    got = assemble(events_of(out))[0]
    assert got["content"] == "See you. Goodbye"
    assert [c["function"]["name"] for c in got["tool_calls"]] == ["end_call"]
    assert got["finish"] == "tool_calls"


async def test_each_content_delta_reaches_the_client_before_the_backend_goes_on(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    deltas = ["Thank you, good", "bye", " and take care."]
    parts = [event("", role="assistant") + event(deltas[0])] + [event(d) for d in deltas[1:]]
    releases = [asyncio.Event() for _ in parts]

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for part, release in zip(parts, releases, strict=True):
            await resp.write(part)
            await asyncio.wait_for(release.wait(), 5)
        await resp.write(event(None, finish="stop") + USAGE + DONE)
        await resp.write_eof()
        return resp

    backend.chat(handler)
    client = await make_proxy(CONFIG, backend)
    resp = await client.post("/v1/chat/completions", json=stream_body())
    for part, release in zip(parts, releases, strict=True):
        got = b""
        while len(got) < len(part):
            got += await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert got == part  # forwarded unchanged while the backend waits
        assert not release.is_set()
        release.set()
    rest = events_of(await resp.read())
    assert rest[0]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "end_call"
    assert rest[1]["choices"][0]["finish_reason"] == "tool_calls"
    assert rest[2:] == events_of(USAGE + DONE)


async def test_stream_choices_interleaved_each_on_its_own(
    make_proxy: ProxyFactory, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    both_final = (
        b'data: {"id":"chatcmpl-kw","object":"chat.completion.chunk","created":1700000000,'
        b'"model":"test-model","choices":[{"index":1,"delta":{},"finish_reason":"stop"},'
        b'{"index":2,"delta":{},"finish_reason":"stop"}]}\n\n'
    )
    script = Script(backend)
    script.parts = [
        event("", index=0, role="assistant"),
        event("", index=1, role="assistant"),
        event("", index=2, role="assistant"),
        event("Good", index=0),
        event("Talk to", index=2),
        event("Good", index=1),
        event("bye!", index=0),
        event(" you later", index=2),
        event(" luck!", index=1),
        event(None, index=0, finish="stop"),
        both_final,
        USAGE,
        DONE,
    ]
    client = await make_proxy(CONFIG, backend)
    before = rewritten("end_call")
    caplog.set_level(logging.INFO, logger="chat_proxy.access")
    resp = await client.post("/v1/chat/completions", json=stream_body(n=3))
    out = await resp.read()
    assert rewritten("end_call") == before + 2
    lines = [r for r in caplog.records if r.name == "chat_proxy.access"]
    assert lines[-1].__dict__["tool_calls_rewritten"] == {"end_call": 2}
    assert out.startswith(b"".join(script.parts[:9]))
    got = assemble(events_of(out))
    assert [got[i]["content"] for i in range(3)] == ["Goodbye!", "Good luck!", "Talk to you later"]
    assert [got[i]["finish"] for i in range(3)] == ["tool_calls", "stop", "tool_calls"]
    assert [len(got[i]["tool_calls"]) for i in range(3)] == [1, 0, 1]
    docs = events_of(out[len(b"".join(script.parts[:9])) :])
    # choice 0: its call, its final; choice 2: its call, then the shared final chunk
    assert [
        d if d == "[DONE]" else [(c["index"], c["finish_reason"]) for c in d["choices"]]
        for d in docs
    ] == [
        [(0, None)],
        [(0, "tool_calls")],
        [(2, None)],
        [(1, "stop"), (2, "tool_calls")],
        [],
        "[DONE]",
    ]


async def test_stream_with_native_tool_calls_is_untouched(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    call = {
        "index": 0,
        "id": "call_x",
        "type": "function",
        "function": {"name": "lookup", "arguments": ""},
    }
    script = Script(backend)
    script.parts = [
        event("", role="assistant"),
        event("Goodbye, let me look."),
        event(None, tool_calls=[call]),
        event(None, tool_calls=[{"index": 0, "function": {"arguments": "{}"}}]),
        event(None, finish="tool_calls"),
        USAGE,
        DONE,
    ]
    client = await make_proxy(CONFIG, backend)
    resp = await client.post("/v1/chat/completions", json=stream_body())
    assert await resp.read() == b"".join(script.parts)


async def test_stream_ending_without_a_final_chunk_is_untouched(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    script = Script(backend)
    script.parts = [event("", role="assistant"), event("Goodbye"), DONE]
    client = await make_proxy(CONFIG, backend)
    resp = await client.post("/v1/chat/completions", json=stream_body())
    assert await resp.read() == b"".join(script.parts)


async def test_stream_with_tool_choice_none_is_untouched(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    head, final, tail = reply_stream(["Good", "bye"])
    script = Script(backend)
    script.parts = [head, final, tail]
    client = await make_proxy(CONFIG, backend)
    resp = await client.post("/v1/chat/completions", json=stream_body(tool_choice="none"))
    assert await resp.read() == head + final + tail


# --- ElevenLabs, through the OpenAI SDK -------------------------------------------------

ELEVENLABS_END_CALL = {
    "type": "function",
    "function": {
        "name": "end_call",
        "description": "Call this function to end the call when the conversation is over.",
        "parameters": {
            "type": "object",
            "properties": {
                "reason": {"type": "string", "description": "The reason to end the call"}
            },
            "required": ["reason"],
        },
    },
}


def elevenlabs_request(text: str) -> dict[str, Any]:
    """The custom-LLM request ElevenLabs sends, as the SDK's keyword arguments."""
    return {
        "model": "test-model",
        "messages": [
            {"role": "system", "content": "You are a helpful voice agent."},
            {"role": "assistant", "content": "Hello! How can I help you today?"},
            {"role": "user", "content": text},
        ],
        "temperature": 0.5,
        "max_tokens": 5000,
        "tools": [ELEVENLABS_END_CALL],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "stream_options": {"include_usage": True},
        "extra_body": {
            "elevenlabs_extra_body": {
                "conversation_id": "conv_0123456789abcdef",
                "agent_id": "agent_1",
            },
            "user_id": "user-42",
        },
    }


def sdk(client: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=str(client.make_url("/v1")), api_key="sk-test", max_retries=0
    )


async def sdk_stream_result(
    api: openai.AsyncOpenAI, text: str
) -> tuple[str, list[Any], str | None, Any]:
    stream = await api.chat.completions.create(stream=True, **elevenlabs_request(text))
    content, finish, usage = "", None, None
    calls: list[Any] = []
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            calls.extend(choice.delta.tool_calls or ())
            finish = choice.finish_reason or finish
    return content, calls, finish, usage


async def test_elevenlabs_stream_through_the_sdk(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    script = Script(backend)
    head, final, tail = reply_stream(["It was a pleasure. Good", "bye", " now!"])
    script.parts = [head, final, tail]
    client = await make_proxy(CONFIG, backend)
    api = sdk(client)
    content, calls, finish, usage = await sdk_stream_result(api, "That's all, thanks.")
    assert content == "It was a pleasure. Goodbye now!"
    assert finish == "tool_calls"
    assert len(calls) == 1
    assert calls[0].function.name == "end_call"
    assert CALL_ID.fullmatch(calls[0].id)
    assert json.loads(calls[0].function.arguments) == END_ARGS
    assert usage.total_tokens == 8
    sent = backend.seen[-1].json()
    assert sent["tools"] == [ELEVENLABS_END_CALL]
    assert sent["stream_options"] == {"include_usage": True}

    # the SDK's own stream helper assembles the same tool call
    kwargs = elevenlabs_request("That's all, thanks.")
    async with api.chat.completions.stream(**kwargs) as helper:
        final_completion = await helper.get_final_completion()
    choice = final_completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "It was a pleasure. Goodbye now!"
    assert choice.message.tool_calls is not None
    assert [c.function.name for c in choice.message.tool_calls] == ["end_call"]
    assert json.loads(choice.message.tool_calls[0].function.arguments) == END_ARGS
    await api.close()


ECHO = """
upstreams:
  - name: echo
    url: "echo:"
middleware:
  - type: tool_keywords
    rules:
      - tool: end_call
        keywords: [goodbye]
        arguments: {reason: "the user said {match}"}
"""


async def test_elevenlabs_with_the_echo_upstream(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(ECHO)
    api = sdk(client)
    content, calls, finish, usage = await sdk_stream_result(api, "ok goodbye")
    assert content == "You said: ok goodbye"
    assert finish == "tool_calls"
    assert [json.loads(c.function.arguments) for c in calls] == [
        {"reason": "the user said goodbye"}
    ]
    assert usage is not None

    # not streamed
    kwargs = elevenlabs_request("ok GOODBYE")
    kwargs.pop("stream_options")
    completion = await api.chat.completions.create(**kwargs)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "You said: ok GOODBYE"
    assert choice.message.tool_calls is not None
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {
        "reason": "the user said GOODBYE"
    }

    # a reply without the keyword stays a plain reply
    content, calls, finish, _ = await sdk_stream_result(api, "ok, good to know")
    assert (content, calls, finish) == ("You said: ok, good to know", [], "stop")
    await api.close()
