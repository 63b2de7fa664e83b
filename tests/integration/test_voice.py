"""The voice middleware: a filler content delta when a stream's first content is late,
sent once, before the model's text, outside the recorded reply and the keyword rules."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy import chain
from proxy.config import ConfigError
from tests.fixtures import (
    BASIC,
    DONE,
    Backend,
    BackendHandler,
    ProxyFactory,
    chat_body,
    chunk,
    completion,
    config_from,
    json_handler,
    metric,
)

Client = TestClient[Any, Any]

FILLER = "... "
VOICE = (
    BASIC
    + """
middleware:
  - type: voice
    filler_after_ms: 150
    filler: "... "
"""
)
SLOW = 0.5  # the stand-in's wait before its first token, in seconds


def slow_head(*parts: bytes, wait: float = SLOW, status: int = 200) -> BackendHandler:
    """A backend that sends nothing at all (not even its head) for `wait` seconds,
    then streams `parts`."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(wait)
        resp = web.StreamResponse(status=status, headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for part in parts:
            await resp.write(part)
        await resp.write_eof()
        return resp

    return handler


def slow_token(*parts: bytes, wait: float = SLOW) -> BackendHandler:
    """A backend whose stream starts at once with the role chunk, then waits `wait`
    seconds before `parts` (a model that is slow to its first token)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk("", role="assistant"))
        await asyncio.sleep(wait)
        for part in parts:
            await resp.write(part)
        await resp.write_eof()
        return resp

    return handler


def after(wait: float, handler: BackendHandler) -> BackendHandler:
    async def delayed(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(wait)
        return await handler(request)

    return delayed


TEXT = (chunk("Hello"), chunk(" world"), chunk(finish="stop"), DONE)


async def events(client: Client, body: dict[str, Any]) -> tuple[int, list[tuple[float, Any]]]:
    """POST a chat request; its status and each SSE data event (JSON, or the text of
    `[DONE]`) with the seconds from the request to its arrival."""
    start = time.perf_counter()
    resp = await client.post("/v1/chat/completions", json=body)
    got: list[tuple[float, Any]] = []
    async for line in resp.content:
        text = line.decode().strip()
        if text.startswith("data: "):
            data = text[6:]
            got.append(
                (time.perf_counter() - start, data if data == "[DONE]" else json.loads(data))
            )
    return resp.status, got


def contents(got: list[tuple[float, Any]], index: int = 0) -> list[str]:
    return [
        c["delta"]["content"]
        for _, doc in got
        if isinstance(doc, dict)
        for c in doc.get("choices", ())
        if c["index"] == index and c["delta"].get("content")
    ]


def roles(got: list[tuple[float, Any]]) -> int:
    return sum(
        1
        for _, doc in got
        if isinstance(doc, dict)
        for c in doc.get("choices", ())
        if "role" in c.get("delta", {})
    )


def sdk(client: Client) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)


async def sdk_stream(client: Client, **extra: Any) -> tuple[list[tuple[float, str]], Any]:
    """The OpenAI SDK's streaming helper: each content delta with its arrival time,
    and the completion the SDK accumulates (which must parse)."""
    times: list[tuple[float, str]] = []
    start = time.perf_counter()
    async with sdk(client).chat.completions.stream(
        model="test-model", messages=[{"role": "user", "content": "Hi"}], **extra
    ) as stream:
        async for event in stream:
            if event.type == "content.delta" and event.delta:
                times.append((time.perf_counter() - start, event.delta))
        final = await stream.get_final_completion()
    return times, final


@pytest.mark.parametrize("handler", [slow_head(*TEXT), slow_token(*TEXT)], ids=["head", "token"])
async def test_slow_first_token_gets_the_filler_on_time_and_once(
    backend: Backend, make_proxy: ProxyFactory, handler: BackendHandler
) -> None:
    backend.chat(handler)
    client = await make_proxy(VOICE, backend)
    times, final = await sdk_stream(client)
    assert [d for _, d in times] == [FILLER, "Hello", " world"]
    at = times[0][0]
    assert 0.15 <= at < 0.4, at
    assert times[1][0] >= SLOW
    message = final.choices[0].message
    assert message.role == "assistant"
    assert message.content == FILLER + "Hello world"
    assert final.choices[0].finish_reason == "stop"

    # on the wire: one role, the filler chunk well formed
    status, got = await events(client, chat_body(stream=True))
    assert status == 200
    assert contents(got) == [FILLER, "Hello", " world"]
    assert roles(got) == 1
    filler = next(doc for _, doc in got if contents([(0, doc)]) == [FILLER])
    assert filler["object"] == "chat.completion.chunk"
    assert [(c["index"], c["finish_reason"]) for c in filler["choices"]] == [(0, None)]
    assert isinstance(filler["id"], str) and isinstance(filler["created"], int)
    assert got[-1][1] == "[DONE]"
    metrics = await (await client.get("/metrics")).text()
    assert metric(metrics, "chat_proxy_voice_fillers_total") >= 2


async def test_filler_before_the_backend_has_the_requests_model(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    backend.chat(slow_head(*TEXT))
    client = await make_proxy(VOICE, backend)
    _, got = await events(client, chat_body(stream=True))
    filler = got[0][1]
    assert filler["model"] == "test-model"
    assert filler["id"].startswith("chatcmpl-") and filler["id"] != "chatcmpl-test"
    assert "role" not in got[1][1]["choices"][0]["delta"]  # the backend's was dropped


async def test_filler_in_a_started_stream_takes_its_id(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    backend.chat(slow_token(*TEXT))
    client = await make_proxy(VOICE, backend)
    _, got = await events(client, chat_body(stream=True))
    first, filler = got[0][1], got[1][1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    # the role went with the backend's first chunk: the filler does not repeat it
    assert filler["choices"][0]["delta"] == {"content": FILLER}
    assert (filler["id"], filler["created"], filler["model"]) == (
        "chatcmpl-test",
        1700000000,
        "test-model",
    )


async def test_fast_stream_gets_no_filler(backend: Backend, make_proxy: ProxyFactory) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk("Hello", role="assistant"))
        await asyncio.sleep(0.3)  # a pause after the first content is no silence
        for part in TEXT[1:]:
            await resp.write(part)
        await resp.write_eof()
        return resp

    backend.chat(handler)
    client = await make_proxy(VOICE, backend)
    times, final = await sdk_stream(client)
    assert [d for _, d in times] == ["Hello", " world"]
    assert final.choices[0].message.content == "Hello world"
    _, got = await events(client, chat_body(stream=True))
    assert contents(got) == ["Hello", " world"]


async def test_non_streamed_gets_no_filler(backend: Backend, make_proxy: ProxyFactory) -> None:
    backend.chat(after(0.4, json_handler(completion("Hello!"))))
    client = await make_proxy(VOICE, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 200
    doc = await resp.json()
    assert doc["choices"][0]["message"]["content"] == "Hello!"


async def test_the_recorded_turn_has_no_filler(backend: Backend, make_proxy: ProxyFactory) -> None:
    backend.chat(slow_head(*TEXT))
    client = await make_proxy(VOICE + "  - type: session\n", backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    sid = resp.headers["x-session-id"]
    body = await resp.text()
    assert FILLER.strip() in body
    got = await client.get(f"/v1/sessions/{sid}")
    assert got.status == 200
    turns = (await got.json())["turns"]
    assert len(turns) == 1
    assert turns[0]["response"]["content"] == "Hello world"
    assert "..." not in json.dumps(turns)


END_CALL = {
    "type": "function",
    "function": {
        "name": "end_call",
        "parameters": {"type": "object", "properties": {}},
    },
}
REWRITTEN = "chat_proxy_tool_calls_rewritten_total"
KEYWORDS = (
    BASIC
    + """
middleware:
  - type: voice
    filler_after_ms: 150
    filler: "goodbye... "
  - type: tool_keywords
    rules:
      - tool: end_call
        keywords: [goodbye]
"""
)


async def test_keyword_rules_do_not_match_the_filler(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    backend.chat(slow_head(chunk("Let me check."), chunk(finish="stop"), DONE))
    client = await make_proxy(KEYWORDS, backend)
    rewritten = metric(await (await client.get("/metrics")).text(), REWRITTEN, tool="end_call")
    _, got = await events(client, chat_body(stream=True, tools=[END_CALL]))
    assert contents(got) == ["goodbye... ", "Let me check."]
    assert not any(
        c["delta"].get("tool_calls") for _, d in got if isinstance(d, dict) for c in d["choices"]
    )
    finish = [c["finish_reason"] for _, d in got if isinstance(d, dict) for c in d["choices"]]
    assert finish[-1] == "stop"
    metrics = await (await client.get("/metrics")).text()
    assert metric(metrics, REWRITTEN, tool="end_call") == rewritten

    # the model's own goodbye still fires the rule
    backend.chat(slow_head(chunk("Goodbye!"), chunk(finish="stop"), DONE))
    times, final = await sdk_stream(client, tools=[END_CALL])
    choice = final.choices[0]
    assert choice.message.content == "goodbye... Goodbye!"
    assert choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls or ()] == ["end_call"]


async def test_tool_call_only_answer_gets_one_filler(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    call = {"index": 0, "id": "call_1", "type": "function"}
    backend.chat(
        slow_head(
            chunk(
                role="assistant",
                tool_calls=[{**call, "function": {"name": "end_call", "arguments": ""}}],
            ),
            chunk(tool_calls=[{"index": 0, "function": {"arguments": "{}"}}]),
            chunk(finish="tool_calls"),
            DONE,
        )
    )
    client = await make_proxy(VOICE, backend)
    times, final = await sdk_stream(client, tools=[END_CALL])
    assert [d for _, d in times] == [FILLER]
    message = final.choices[0].message
    assert message.content == FILLER
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ()] == [
        ("call_1", "end_call", "{}")
    ]


async def test_every_silent_choice_gets_the_filler(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk("Hi", index=1, role="assistant"))  # choice 1 answers at once
        await asyncio.sleep(SLOW)
        for part in (chunk("Hello", index=0, role="assistant"), chunk(finish="stop", index=0)):
            await resp.write(part)
        await resp.write(chunk(finish="stop", index=1) + DONE)
        await resp.write_eof()
        return resp

    backend.chat(handler)
    client = await make_proxy(VOICE, backend)
    _, got = await events(client, chat_body(stream=True, n=2))
    assert contents(got, 0) == [FILLER, "Hello"]
    assert contents(got, 1) == ["Hi"]
    assert roles(got) == 2
    final = await sdk(client).chat.completions.create(
        model="test-model", messages=[{"role": "user", "content": "Hi"}], n=2, stream=True
    )
    text = {0: "", 1: ""}
    async for part in final:
        for c in part.choices:
            text[c.index] += c.delta.content or ""
    assert text == {0: FILLER + "Hello", 1: "Hi"}


async def test_backend_failure_after_the_filler_is_an_error_event(
    backend: Backend, make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    backend.chat(
        after(SLOW, json_handler({"error": {"message": "Traceback (most recent...)"}}, status=500))
    )
    client = await make_proxy(VOICE, backend)
    with caplog.at_level(logging.WARNING):
        status, got = await events(client, chat_body(stream=True))
    assert status == 200
    assert len(got) == 2
    assert got[0][1]["choices"][0]["delta"]["content"] == FILLER
    error = got[1][1]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "api_error"
    assert "Traceback" not in error["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    with pytest.raises(openai.APIError):
        await sdk_stream(client)


async def test_json_answer_after_the_filler_is_an_error_event(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    backend.chat(after(SLOW, json_handler(completion("Hello!"))))
    client = await make_proxy(VOICE, backend)
    status, got = await events(client, chat_body(stream=True))
    assert status == 200
    assert contents(got) == [FILLER]
    assert got[-1][1]["error"]["code"] == "upstream_bad_response"


async def test_a_retry_after_the_filler_still_answers(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    calls = 0
    ok = slow_head(*TEXT, wait=0.1)

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.3)
            return web.json_response({"error": {"message": "busy"}}, status=503)
        return await ok(request)

    backend.chat(handler)
    text = VOICE.replace("timeouts:", "retries: {attempts: 2, backoff_initial: 0}\n    timeouts:")
    client = await make_proxy(text, backend)
    times, final = await sdk_stream(client)
    assert calls == 2
    assert [d for _, d in times] == [FILLER, "Hello", " world"]
    assert final.choices[0].message.content == FILLER + "Hello world"


async def test_options_and_order(make_proxy: ProxyFactory) -> None:
    with pytest.raises(ConfigError) as info:
        config_from(BASIC + "middleware:\n  - type: voice\n    filler_after_ms: 0\n", None)
    assert any("voice.filler_after_ms" in e for e in info.value.errors)
    loaded = config_from(
        BASIC.replace("{backend}", "http://127.0.0.1:9")
        + "middleware:\n  - type: voice\n  - type: rate_limit\n    requests_per_minute: 5\n"
    )
    assert chain.order_warnings(loaded.chain) == [
        "middleware[0].voice: stands before middleware[1].rate_limit; a request it refuses "
        "after the filler went gets its error in a 200 stream"
    ]
    defaults = loaded.chain[0].options
    assert (defaults.filler_after_ms, defaults.filler) == (1200, "... ")  # type: ignore[union-attr]
