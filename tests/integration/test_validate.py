"""validate: every parameter's good and bad values, through HTTP, and what the
backend receives."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from aiohttp import web

from proxy.chain import BuildContext
from proxy.config import ConfigError
from proxy.exchange import Exchange, Handler, Middleware
from tests.fixtures import BASIC, Backend, ProxyFactory, chat_body, config_from, json_handler

CONFIG = (
    BASIC
    + """
middleware:
  - type: validate
    max_n: 4
    max_messages: 50
    max_tools: 3
"""
)

DROP = object()  # a patch value that removes the field from the base body

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
END_CALL = {"type": "function", "function": {"name": "end_call"}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
USER = {"role": "user", "content": "Hi"}


def tool_turn(assistant: dict[str, Any], tool: dict[str, Any] | None = None) -> list[Any]:
    """user, assistant (with tool calls), tool answer."""
    answer = (
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"} if tool is None else tool
    )
    return [USER, assistant, answer]


def msgs(*messages: Any) -> dict[str, Any]:
    return {"messages": list(messages)}


GOOD: list[Any] = [
    # messages
    pytest.param(msgs({"role": "system", "content": "Be brief."}, USER), id="system"),
    pytest.param(msgs({"role": "developer", "content": "Be brief."}, USER), id="developer"),
    pytest.param(msgs({"role": "user", "content": "Hi", "name": "ann"}), id="name"),
    pytest.param(msgs({"role": "user", "content": ""}), id="empty-string-content"),
    pytest.param(
        msgs(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            }
        ),
        id="content-parts",
    ),
    pytest.param(
        {"messages": tool_turn({"role": "assistant", "content": None, "tool_calls": [CALL]})},
        id="assistant-null-content-with-tool-calls",
    ),
    pytest.param(
        {"messages": tool_turn({"role": "assistant", "tool_calls": [CALL]})},
        id="assistant-no-content-with-tool-calls",
    ),
    pytest.param(
        {
            "messages": tool_turn(
                {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL]},
                {
                    "role": "tool",
                    "tool_call_id": "call_1",
                    "content": [{"type": "text", "text": "sunny"}],
                },
            )
        },
        id="tool-content-parts",
    ),
    pytest.param(msgs(*([USER] * 50)), id="max-messages"),
    # the other parameters
    pytest.param({"stream": True}, id="stream-true"),
    pytest.param({"stream": False}, id="stream-false"),
    pytest.param({"temperature": 0}, id="temperature-0"),
    pytest.param({"temperature": 2}, id="temperature-2"),
    pytest.param({"temperature": 0.7}, id="temperature-0.7"),
    pytest.param({"temperature": None}, id="temperature-null"),
    pytest.param({"max_tokens": 1}, id="max_tokens-1"),
    pytest.param({"max_tokens": 2**53 - 1}, id="max_tokens-largest"),
    pytest.param({"max_completion_tokens": 256}, id="max_completion_tokens"),
    pytest.param({"top_p": 0}, id="top_p-0"),
    pytest.param({"top_p": 1}, id="top_p-1"),
    pytest.param({"top_p": 0.95}, id="top_p-0.95"),
    pytest.param({"frequency_penalty": -2}, id="frequency_penalty--2"),
    pytest.param({"frequency_penalty": 2.0}, id="frequency_penalty-2.0"),
    pytest.param({"presence_penalty": 0.5}, id="presence_penalty"),
    pytest.param({"stop": "END"}, id="stop-string"),
    pytest.param({"stop": ["a", "b", "c", "d"]}, id="stop-4"),
    pytest.param({"stop": []}, id="stop-empty"),
    pytest.param({"n": 1}, id="n-1"),
    pytest.param({"n": 4}, id="n-max"),
    pytest.param({"tools": [WEATHER, END_CALL]}, id="tools"),
    pytest.param(
        {"tools": [WEATHER, END_CALL, {**END_CALL, "function": {"name": "a-b_C9"}}]}, id="tools-max"
    ),
    pytest.param(
        {"tools": [{"type": "function", "function": {"name": "x" * 64}}]}, id="tool-name-64"
    ),
    pytest.param({"tools": [WEATHER], "tool_choice": "none"}, id="tool_choice-none"),
    pytest.param({"tool_choice": "auto"}, id="tool_choice-auto-without-tools"),
    pytest.param({"tools": [WEATHER], "tool_choice": "required"}, id="tool_choice-required"),
    pytest.param(
        {
            "tool_choice": {"type": "function", "function": {"name": "end_call"}},
            "tools": [WEATHER, END_CALL],
        },
        id="tool_choice-named-before-tools",
    ),
    pytest.param({"tools": [WEATHER], "parallel_tool_calls": False}, id="parallel_tool_calls"),
    pytest.param({"stream": True, "stream_options": {"include_usage": True}}, id="stream_options"),
    pytest.param({"model": "any name at all"}, id="model-any"),
    pytest.param({"model": DROP}, id="model-absent"),
    pytest.param({"user": "user-42"}, id="user"),
    pytest.param({"seed": 42}, id="seed"),
    pytest.param({"seed": -(2**63)}, id="seed-int64-min"),
    pytest.param({"response_format": {"type": "json_object"}}, id="response_format-json_object"),
    pytest.param(
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "r", "schema": {"type": "object"}},
            }
        },
        id="response_format-json_schema",
    ),
    pytest.param({"logprobs": True, "top_logprobs": 5}, id="logprobs"),
    pytest.param({"logit_bias": {"50256": -100, "11": 2.5}}, id="logit_bias"),
    pytest.param({"metadata": {"team": "a"}, "store": False}, id="metadata-store"),
    pytest.param({"modalities": ["text"]}, id="modalities"),
    pytest.param({"reasoning_effort": "low"}, id="reasoning_effort"),
    pytest.param({"functions": [{"name": "f"}], "function_call": {"name": "f"}}, id="functions"),
    # fields the API does not name pass under extra_params: allow (the default)
    pytest.param({"top_k": 40, "repetition_penalty": 1.1, "min_p": 0.05}, id="vllm-sampling"),
    pytest.param({"guided_json": {"type": "object"}}, id="vllm-guided_json"),
]


BAD: list[Any] = [
    # messages
    pytest.param({"messages": DROP}, "messages", id="messages-missing"),
    pytest.param({"messages": None}, "messages", id="messages-null"),
    pytest.param({"messages": []}, "messages", id="messages-empty"),
    pytest.param({"messages": "Hi"}, "messages", id="messages-string"),
    pytest.param(msgs(*([USER] * 51)), "messages", id="messages-too-many"),
    pytest.param(msgs("Hi"), "messages[0]", id="message-string"),
    pytest.param(
        msgs(USER, USER, {"role": "bot", "content": "x"}), "messages[2].role", id="role-unknown"
    ),
    pytest.param(msgs({"content": "x"}), "messages[0].role", id="role-missing"),
    pytest.param(
        msgs({"role": "function", "content": "x", "name": "f"}),
        "messages[0].role",
        id="role-function",
    ),
    pytest.param(msgs({"role": "user", "content": 5}), "messages[0].content", id="content-number"),
    pytest.param(
        msgs({"role": "user", "content": None}), "messages[0].content", id="user-content-null"
    ),
    pytest.param(msgs({"role": "user"}), "messages[0].content", id="user-content-missing"),
    pytest.param(
        msgs(USER, {"role": "assistant", "content": None}),
        "messages[1].content",
        id="assistant-null",
    ),
    pytest.param(
        msgs(USER, {"role": "assistant", "tool_calls": []}),
        "messages[1].content",
        id="assistant-empty-calls",
    ),
    pytest.param(
        msgs({"role": "user", "content": []}), "messages[0].content", id="content-empty-array"
    ),
    pytest.param(
        msgs({"role": "user", "content": ["hi"]}), "messages[0].content[0]", id="part-string"
    ),
    pytest.param(
        msgs({"role": "user", "content": [{"text": "hi"}]}),
        "messages[0].content[0].type",
        id="part-no-type",
    ),
    pytest.param(
        msgs({"role": "user", "content": [{"type": "text"}]}),
        "messages[0].content[0].text",
        id="text-no-text",
    ),
    pytest.param(
        msgs({"role": "user", "content": [{"type": "text", "text": 1}]}),
        "messages[0].content[0].text",
        id="text-number",
    ),
    pytest.param(
        msgs({"role": "user", "content": "x", "name": 1}), "messages[0].name", id="name-number"
    ),
    pytest.param(
        {
            "messages": tool_turn(
                {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "sunny"}
            )
        },
        "messages[2].tool_call_id",
        id="tool-without-call-id",
    ),
    pytest.param(
        {
            "messages": tool_turn(
                {"role": "assistant", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": 1, "content": "x"},
            )
        },
        "messages[2].tool_call_id",
        id="tool-call-id-number",
    ),
    pytest.param(
        {"messages": tool_turn({"role": "assistant", "tool_calls": [{**CALL, "id": None}]})},
        "messages[1].tool_calls[0].id",
        id="tool-call-no-id",
    ),
    pytest.param(
        {"messages": tool_turn({"role": "assistant", "tool_calls": [{**CALL, "type": "fn"}]})},
        "messages[1].tool_calls[0].type",
        id="tool-call-type",
    ),
    pytest.param(
        {
            "messages": tool_turn(
                {
                    "role": "assistant",
                    "tool_calls": [{**CALL, "function": {"name": "f", "arguments": {}}}],
                }
            )
        },
        "messages[1].tool_calls[0].function.arguments",
        id="tool-call-arguments-object",
    ),
    pytest.param(
        {"messages": tool_turn({"role": "assistant", "tool_calls": {"id": "x"}})},
        "messages[1].tool_calls",
        id="tool-calls-object",
    ),
    # stream
    pytest.param({"stream": "true"}, "stream", id="stream-string"),
    pytest.param({"stream": 1}, "stream", id="stream-number"),
    # temperature and the other numbers: bool, strings, NaN and Infinity are no numbers
    pytest.param({"temperature": 3}, "temperature", id="temperature-3"),
    pytest.param({"temperature": -0.1}, "temperature", id="temperature-negative"),
    pytest.param({"temperature": True}, "temperature", id="temperature-true"),
    pytest.param({"temperature": "0.5"}, "temperature", id="temperature-string"),
    pytest.param({"temperature": float("nan")}, "temperature", id="temperature-nan"),
    pytest.param({"temperature": float("inf")}, "temperature", id="temperature-infinity"),
    pytest.param({"top_p": 1.5}, "top_p", id="top_p-1.5"),
    pytest.param({"top_p": -0.5}, "top_p", id="top_p-negative"),
    pytest.param({"frequency_penalty": 2.5}, "frequency_penalty", id="frequency_penalty-2.5"),
    pytest.param(
        {"frequency_penalty": float("-inf")}, "frequency_penalty", id="frequency_penalty--inf"
    ),
    pytest.param({"presence_penalty": -3}, "presence_penalty", id="presence_penalty--3"),
    pytest.param({"presence_penalty": [1]}, "presence_penalty", id="presence_penalty-array"),
    # integers: integers only, positive, not huge
    pytest.param({"max_tokens": 0}, "max_tokens", id="max_tokens-0"),
    pytest.param({"max_tokens": -5}, "max_tokens", id="max_tokens-negative"),
    pytest.param({"max_tokens": 2.5}, "max_tokens", id="max_tokens-2.5"),
    pytest.param({"max_tokens": 2.0}, "max_tokens", id="max_tokens-2.0"),
    pytest.param({"max_tokens": True}, "max_tokens", id="max_tokens-true"),
    pytest.param({"max_tokens": "100"}, "max_tokens", id="max_tokens-string"),
    pytest.param({"max_tokens": 2**53}, "max_tokens", id="max_tokens-huge"),
    pytest.param(
        {"max_completion_tokens": 0}, "max_completion_tokens", id="max_completion_tokens-0"
    ),
    pytest.param({"n": 0}, "n", id="n-0"),
    pytest.param({"n": 5}, "n", id="n-over-max_n"),
    pytest.param({"n": True}, "n", id="n-true"),
    pytest.param({"n": 1.0}, "n", id="n-1.0"),
    pytest.param({"seed": 1.5}, "seed", id="seed-decimal"),
    pytest.param({"seed": 2**63}, "seed", id="seed-over-int64"),
    # stop
    pytest.param({"stop": ["a", "b", "c", "d", "e"]}, "stop", id="stop-5"),
    pytest.param({"stop": ["a", 1]}, "stop[1]", id="stop-number-item"),
    pytest.param({"stop": 5}, "stop", id="stop-number"),
    # tools and tool_choice
    pytest.param({"tools": WEATHER}, "tools", id="tools-object"),
    pytest.param(
        {"tools": [WEATHER, END_CALL, WEATHER, END_CALL]}, "tools", id="tools-over-max_tools"
    ),
    pytest.param({"tools": [{"type": "retrieval"}]}, "tools[0].type", id="tool-type"),
    pytest.param(
        {"tools": [WEATHER, {"type": "function"}]}, "tools[1].function", id="tool-no-function"
    ),
    pytest.param(
        {"tools": [{"type": "function", "function": {}}]},
        "tools[0].function.name",
        id="tool-no-name",
    ),
    pytest.param(
        {"tools": [{"type": "function", "function": {"name": "get weather"}}]},
        "tools[0].function.name",
        id="tool-name-space",
    ),
    pytest.param(
        {"tools": [{"type": "function", "function": {"name": "x" * 65}}]},
        "tools[0].function.name",
        id="tool-name-65",
    ),
    pytest.param(
        {"tools": [{"type": "function", "function": {"name": "f\n"}}]},
        "tools[0].function.name",
        id="tool-name-newline",
    ),
    pytest.param(
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
        "tools[0].function.parameters",
        id="tool-parameters-string",
    ),
    pytest.param(
        {"tools": [{"type": "function", "function": {"name": "f", "description": 1}}]},
        "tools[0].function.description",
        id="tool-description-number",
    ),
    pytest.param(
        {"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", id="tool_choice-unknown"
    ),
    pytest.param({"tools": [WEATHER], "tool_choice": 1}, "tool_choice", id="tool_choice-number"),
    pytest.param(
        {"tool_choice": "required"}, "tool_choice", id="tool_choice-required-without-tools"
    ),
    pytest.param(
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "end_call"}}},
        "tool_choice.function.name",
        id="tool_choice-undeclared",
    ),
    pytest.param(
        {
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "tools": [{"type": "function", "function": {}}],
        },
        "tools[0].function.name",
        id="bad-tools-reported-before-tool_choice",
    ),
    pytest.param(
        {"tools": [WEATHER], "parallel_tool_calls": "no"},
        "parallel_tool_calls",
        id="parallel_tool_calls",
    ),
    # stream_options: an object, with stream true only
    pytest.param(
        {"stream_options": {"include_usage": True}},
        "stream_options",
        id="stream_options-without-stream",
    ),
    pytest.param(
        {"stream": False, "stream_options": {"include_usage": True}},
        "stream_options",
        id="stream_options-stream-false",
    ),
    pytest.param(
        {"stream": True, "stream_options": "usage"}, "stream_options", id="stream_options-string"
    ),
    pytest.param(
        {"stream": True, "stream_options": {"include_usage": "yes"}},
        "stream_options.include_usage",
        id="include_usage-string",
    ),
    # ElevenLabs fields
    pytest.param(
        {"elevenlabs_extra_body": "conv_1"}, "elevenlabs_extra_body", id="elevenlabs-string"
    ),
    pytest.param(
        {"elevenlabs_extra_body": {"conversation_id": 5}},
        "elevenlabs_extra_body.conversation_id",
        id="elevenlabs-conversation-number",
    ),
    pytest.param({"user_id": 5}, "user_id", id="user_id-number"),
    # the rest
    pytest.param({"model": 5}, "model", id="model-number"),
    pytest.param({"user": {"id": 1}}, "user", id="user-object"),
    pytest.param({"response_format": "json"}, "response_format", id="response_format-string"),
    pytest.param(
        {"response_format": {"type": "json_schema"}},
        "response_format.json_schema",
        id="response_format-no-schema",
    ),
    pytest.param({"logprobs": "yes"}, "logprobs", id="logprobs-string"),
    pytest.param({"top_logprobs": 5}, "top_logprobs", id="top_logprobs-without-logprobs"),
    pytest.param({"logprobs": True, "top_logprobs": 21}, "top_logprobs", id="top_logprobs-21"),
    pytest.param({"logit_bias": {"abc": 1}}, "logit_bias", id="logit_bias-key"),
    pytest.param({"logit_bias": {"1": 200}}, "logit_bias.1", id="logit_bias-value"),
    pytest.param({"metadata": ["a"]}, "metadata", id="metadata-array"),
    pytest.param({"modalities": "text"}, "modalities", id="modalities-string"),
    # NaN is refused wherever it is, extra fields included
    pytest.param({"top_k": float("nan")}, "top_k", id="nan-in-extra-field"),
    pytest.param(
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"default": float("inf")}},
                }
            ]
        },
        "tools[0].function.parameters.default",
        id="infinity-nested",
    ),
]


def patched(patch: dict[str, Any]) -> dict[str, Any]:
    body = chat_body()
    for key, value in patch.items():
        if value is DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return body


@pytest.mark.parametrize("patch", GOOD)
async def test_good_values_are_forwarded(
    make_proxy: ProxyFactory, backend: Backend, patch: dict[str, Any]
) -> None:
    client = await make_proxy(CONFIG, backend)
    resp = await client.post("/v1/chat/completions", json=patched(patch))
    assert resp.status == 200, await resp.text()
    seen = backend.seen[-1].json()
    for key, value in patch.items():
        if value is DROP:
            assert key not in seen
        else:
            assert seen[key] == value


@pytest.mark.parametrize(("patch", "param"), BAD)
async def test_bad_values_answer_400_naming_the_param(
    make_proxy: ProxyFactory, backend: Backend, patch: dict[str, Any], param: str
) -> None:
    client = await make_proxy(CONFIG, backend)
    resp = await client.post("/v1/chat/completions", json=patched(patch))
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert f"'{param}'" in error["message"]
    assert backend.seen == []


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (
            {"temperature": 3},
            "Invalid value for 'temperature': expected a number between 0 and 2, got 3.",
        ),
        (
            {"temperature": "0.5"},
            "Invalid type for 'temperature': expected a number, got a string.",
        ),
        (
            {"temperature": True},
            "Invalid type for 'temperature': expected a number, got a boolean.",
        ),
        ({"top_p": float("nan")}, "Invalid value for 'top_p': expected a finite number, got NaN."),
        (
            {"max_tokens": 2.0},
            "Invalid type for 'max_tokens': expected an integer, got a decimal number.",
        ),
        ({"max_tokens": 0}, "Invalid value for 'max_tokens': expected a positive integer, got 0."),
        ({"n": 9}, "Invalid value for 'n': expected an integer between 1 and 4, got 9."),
        ({"messages": DROP}, "Missing required parameter: 'messages'."),
        (
            msgs({"role": "bot", "content": "x"}),
            "Invalid value for 'messages[0].role': expected one of 'system', 'developer', 'user', "
            "'assistant' or 'tool', got \"bot\".",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "get weather"}}]},
            "Invalid value for 'tools[0].function.name': expected a name of 1 to 64 letters, digits, "
            'underscores or dashes, got "get weather".',
        ),
    ],
)
async def test_messages_say_what_was_expected(
    make_proxy: ProxyFactory, backend: Backend, patch: dict[str, Any], message: str
) -> None:
    client = await make_proxy(CONFIG, backend)
    resp = await client.post("/v1/chat/completions", json=patched(patch))
    assert resp.status == 400
    assert (await resp.json())["error"]["message"] == message


async def test_infinity_from_an_overflowing_literal_is_refused(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(CONFIG, backend)
    raw = b'{"messages":[{"role":"user","content":"Hi"}],"temperature":1e400}'
    resp = await client.post(
        "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "temperature"
    assert (
        error["message"]
        == "Invalid value for 'temperature': expected a finite number, got Infinity."
    )


# --- ElevenLabs fields --------------------------------------------------------------


def record_extra(options: dict[str, Any], ctx: BuildContext) -> Middleware:
    """A test-only middleware placed after validate: shows what the ElevenLabs
    dialect left for later middlewares."""

    async def mw(ex: Exchange, call_next: Handler) -> web.StreamResponse:
        shown = (
            {"elevenlabs_extra_body": ex.elevenlabs_extra_body} if ex.elevenlabs_extra_body else {}
        )
        ex.response_headers["x-test-extra"] = json.dumps(shown)
        return await call_next(ex)

    return mw


ELEVENLABS = (
    BASIC
    + """
middleware:
  - type: validate
  - type: tests.integration.test_validate:record_extra
"""
)


async def test_elevenlabs_extra_body_is_kept_for_later_middlewares_and_not_forwarded(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(ELEVENLABS, backend)
    extra = {"conversation_id": "conv_123", "agent": {"x": 1}}
    resp = await client.post(
        "/v1/chat/completions",
        json=chat_body(elevenlabs_extra_body=extra, user_id="el-user-9", stream=True),
    )
    assert resp.status == 200
    assert json.loads(resp.headers["x-test-extra"]) == {"elevenlabs_extra_body": extra}
    seen = backend.seen[-1].json()
    assert "elevenlabs_extra_body" not in seen
    assert "user_id" not in seen
    assert seen["user"] == "el-user-9"
    assert seen["stream"] is True


async def test_user_id_does_not_replace_user(make_proxy: ProxyFactory, backend: Backend) -> None:
    client = await make_proxy(ELEVENLABS, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(user="mine", user_id="theirs"))
    assert resp.status == 200
    seen = backend.seen[-1].json()
    assert seen["user"] == "mine"
    assert "user_id" not in seen
    assert json.loads(resp.headers["x-test-extra"]) == {}


async def test_null_elevenlabs_extra_body_is_not_forwarded(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(ELEVENLABS, backend)
    resp = await client.post(
        "/v1/chat/completions", json=chat_body(elevenlabs_extra_body=None, user_id=None)
    )
    assert resp.status == 200
    seen = backend.seen[-1].json()
    assert "elevenlabs_extra_body" not in seen
    assert "user_id" not in seen
    assert "user" not in seen


# --- extra_params and limits ---------------------------------------------------------


def with_options(options: str) -> str:
    return (
        BASIC
        + "\nmiddleware:\n  - type: validate\n"
        + "".join(f"    {line}\n" for line in options.splitlines())
    )


VLLM_FIELDS = {"top_k": 40, "repetition_penalty": 1.1, "guided_json": {"type": "object"}}


async def test_extra_params_drop_removes_unknown_fields_only(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(with_options("extra_params: drop"), backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(temperature=0.5, **VLLM_FIELDS))
    assert resp.status == 200
    seen = backend.seen[-1].json()
    assert not set(VLLM_FIELDS) & set(seen)
    assert seen["temperature"] == 0.5
    assert seen["messages"] == chat_body()["messages"]


async def test_extra_params_reject_names_the_field(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(with_options("extra_params: reject"), backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(temperature=0.5, top_k=40))
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "top_k"
    assert error["code"] == "unknown_parameter"
    assert backend.seen == []
    # the ElevenLabs fields are known, not extra
    resp = await client.post(
        "/v1/chat/completions",
        json=chat_body(elevenlabs_extra_body={"conversation_id": "c"}, user_id="u"),
    )
    assert resp.status == 200


async def test_default_limits(make_proxy: ProxyFactory, backend: Backend) -> None:
    client = await make_proxy(with_options("extra_params: allow"), backend)
    assert (await client.post("/v1/chat/completions", json=chat_body(n=8))).status == 200
    resp = await client.post("/v1/chat/completions", json=chat_body(n=9))
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "n"
    tools = [{"type": "function", "function": {"name": f"t{i}"}} for i in range(129)]
    resp = await client.post("/v1/chat/completions", json=chat_body(tools=tools))
    assert resp.status == 400
    assert (await resp.json())["error"][
        "message"
    ] == "Invalid value for 'tools': expected at most 128 tools, got 129."
    assert (
        await client.post("/v1/chat/completions", json=chat_body(tools=tools[:128]))
    ).status == 200


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError) as info:
        config_from(with_options("extra_params: maybe\nmax_n: 0\nmax_tools: x"))
    text = "\n".join(info.value.errors)
    assert "middleware[0].validate.extra_params: must be one of" in text
    assert "middleware[0].validate.max_n: must be a positive integer" in text
    assert "middleware[0].validate.max_tools: must be an integer" in text


async def test_other_routes_pass_untouched(make_proxy: ProxyFactory, backend: Backend) -> None:
    backend.on("POST", "/v1/embeddings", json_handler({"object": "list", "data": []}))
    client = await make_proxy(CONFIG, backend)
    body = {"model": "e", "input": "x", "temperature": 9, "elevenlabs_extra_body": "kept"}
    resp = await client.post("/v1/embeddings", json=body)
    assert resp.status == 200
    assert backend.seen[-1].json() == body
    assert (await client.get("/v1/models")).status == 200


async def test_openai_sdk_requests_pass_and_errors_reach_it(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(CONFIG, backend)
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
    answer = await sdk.chat.completions.create(
        model="junis-orchestrator",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        temperature=0.2,
        max_tokens=64,
        stop=["\n\n"],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="auto",
        extra_body={"elevenlabs_extra_body": {"conversation_id": "conv_1"}},
    )
    assert answer.choices[0].message.content == "Hello!"
    seen = backend.seen[-1].json()
    assert seen["tools"] == [WEATHER]
    assert "elevenlabs_extra_body" not in seen
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], temperature=2.5
        )
    assert info.value.status_code == 400
    assert isinstance(info.value.body, dict)
    assert info.value.body["param"] == "temperature"
    assert len(backend.seen) == 1
    await sdk.close()
