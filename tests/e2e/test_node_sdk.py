"""The OpenAI Node SDK (openai 7.x, tests/e2e/node/chat.mjs) as a client of the proxy.

Each test starts the proxy in process and runs ``node chat.mjs <base_url> <api_key>
<params>``, which prints what the SDK returned or raised as JSON. Backends: the
built-in echo upstream, the real llama.cpp server, and the recorded streams of vLLM,
Ollama, OpenAI and llama.cpp's llama-server replayed by a scripted stand-in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

try:
    from .llama_server import LlamaBackend
except ImportError:
    from llama_server import LlamaBackend

from tests.fixtures import Backend, ProxyFactory, sse_handler

NodeSDK = Any  # the `node_sdk` fixture (tests/e2e/conftest.py)
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sse"
KEY = "sk-node-0123456789abcdef"

ECHO = """
upstreams:
  - name: echo
    url: "echo:"
"""

LLAMA = """
upstreams:
  - name: llama
    url: {llama}
    timeouts: {connect: 2, first_byte: 20, idle: 20}
"""

STAND_IN = """
upstreams:
  - name: main
    url: {backend}
    timeouts: {connect: 2, first_byte: 5, idle: 5}
"""

GUARDED = """
upstreams:
  - name: echo
    url: "echo:"
middleware:
  - type: auth
    keys:
      - id: node
        key: ${NODE_KEY}
        limits: {requests_per_minute: 1}
  - type: rate_limit
  - type: validate
"""


def base_url(client: Any) -> str:
    return str(client.make_url("/v1"))


def user(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "demo", "messages": [{"role": "user", "content": text}], **extra}


# -- echo ------------------------------------------------------------------------------


async def test_echo_non_streamed(make_proxy: ProxyFactory, node_sdk: NodeSDK) -> None:
    client = await make_proxy(ECHO)
    got = await node_sdk.run(base_url(client), "unused", user("hello from node"))
    assert got["ok"], got
    assert got["status"] == 200
    assert got["content"] == "You said: hello from node"
    assert got["finish_reason"] == "stop"
    assert got["usage"]["completion_tokens"] == 5
    assert got["headers"]["x-request-id"].startswith("req_")


async def test_echo_streamed_with_usage(make_proxy: ProxyFactory, node_sdk: NodeSDK) -> None:
    client = await make_proxy(ECHO)
    params = user("stream to node", stream=True, stream_options={"include_usage": True})
    got = await node_sdk.run(base_url(client), "unused", params)
    assert got["ok"], got
    assert got["headers"]["content-type"] == "text/event-stream"
    assert got["content"] == "You said: stream to node"
    assert got["finish_reason"] == "stop"
    assert got["usage"]["total_tokens"] > 0
    assert got["chunks"] == 1 + 5 + 1 + 1  # role, words, finish, usage


# -- llama -----------------------------------------------------------------------------


async def _direct_text(backend: LlamaBackend, params: dict[str, Any]) -> str:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.post(f"{backend.base_url}/chat/completions", json=params) as resp,
    ):
        doc = await resp.json()
    text: str = doc["choices"][0]["message"]["content"]
    return text


def _llama_params(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me about the proxy."}],
        "max_tokens": 10,
        "temperature": 0,
        **extra,
    }


async def test_llama_non_streamed(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend, node_sdk: NodeSDK
) -> None:
    client = await llama_proxy(LLAMA)
    params = _llama_params(llama_backend.model)
    got = await node_sdk.run(base_url(client), "unused", params)
    assert got["ok"], got
    assert got["model"] == llama_backend.model
    assert got["finish_reason"] == "length"
    assert got["usage"]["completion_tokens"] == 10
    assert got["content"] == await _direct_text(llama_backend, params)


async def test_llama_streamed(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend, node_sdk: NodeSDK
) -> None:
    client = await llama_proxy(LLAMA)
    params = _llama_params(llama_backend.model)
    streamed = {**params, "stream": True, "stream_options": {"include_usage": True}}
    got = await node_sdk.run(base_url(client), "unused", streamed)
    assert got["ok"], got
    assert got["finish_reason"] == "length"
    assert got["usage"] is None  # llama never sends a usage chunk
    assert got["content"] == await _direct_text(llama_backend, params)


# -- errors as the SDK's classes -------------------------------------------------------


async def test_bad_key_is_an_authentication_error(
    make_proxy: ProxyFactory, node_sdk: NodeSDK
) -> None:
    client = await make_proxy(GUARDED, env={"NODE_KEY": KEY})
    got = await node_sdk.run(base_url(client), "sk-wrong", user("hi"))
    assert not got["ok"]
    assert got["class"] == "AuthenticationError"
    assert got["status"] == 401
    assert got["type"] == "authentication_error"
    assert got["error"]["message"] in got["message"]
    assert "key" in got["error"]["message"].lower()


async def test_bad_temperature_is_a_bad_request_error(
    make_proxy: ProxyFactory, node_sdk: NodeSDK
) -> None:
    client = await make_proxy(GUARDED, env={"NODE_KEY": KEY})
    got = await node_sdk.run(base_url(client), KEY, user("hi", temperature=5))
    assert not got["ok"]
    assert got["class"] == "BadRequestError"
    assert got["status"] == 400
    assert got["param"] == "temperature"
    assert got["type"] == "invalid_request_error"
    assert "temperature" in got["message"]


async def test_over_the_limit_is_a_rate_limit_error(
    make_proxy: ProxyFactory, node_sdk: NodeSDK
) -> None:
    client = await make_proxy(GUARDED, env={"NODE_KEY": KEY})
    first = await node_sdk.run(base_url(client), KEY, user("one"))
    assert first["ok"], first
    assert first["headers"]["x-ratelimit-remaining-requests"] == "0"
    got = await node_sdk.run(base_url(client), KEY, user("two"))
    assert not got["ok"]
    assert got["class"] == "RateLimitError"
    assert got["classes"][:2] == ["RateLimitError", "APIError"]
    assert got["status"] == 429
    assert got["code"] == "rate_limit_exceeded"
    assert got["type"] == "rate_limit_error"
    assert "requests per minute (limit 1)" in got["message"]
    assert int(got["headers"]["retry-after"]) >= 1
    assert int(got["headers"]["retry-after-ms"]) > 0


# -- recorded backend streams ------------------------------------------------------------

# content, finish_reason and tool call of choice 0, usage total
RECORDED = {
    "vllm_stream.sse": ("Hello! How can I help?", "stop", None, 20),
    "ollama_stream.sse": ("Let me check.", "tool_calls", ("get_weather", '{"city":"Paris"}'), 109),
    "openai_tools_n2.sse": ("", "tool_calls", ("get_weather", '{"city":"Paris"}'), 104),
    "llamacpp_server_stream.sse": ("Hi there!", "stop", None, 14),
    "crlf_stream.sse": ("Bonjour à tous", "stop", None, None),
    "llamacpp_stream.sse": (None, "length", None, None),  # the real llama's, any text
}


@pytest.mark.parametrize("name", sorted(RECORDED))
async def test_recorded_streams(
    make_proxy: ProxyFactory, backend: Backend, node_sdk: NodeSDK, name: str
) -> None:
    content, finish, tool, total = RECORDED[name]
    backend.chat(sse_handler((FIXTURES / name).read_bytes()))
    client = await make_proxy(STAND_IN, backend)
    got = await node_sdk.run(base_url(client), "unused", user("hi", stream=True))
    assert got["ok"], got
    if content is not None:
        assert got["content"] == content
    else:
        assert got["content"]
    assert got["finish_reason"] == finish
    if tool is None:
        assert got["tool_calls"] == []
    else:
        [call] = got["tool_calls"]
        assert (call["name"], call["arguments"]) == tool
        assert call["id"].startswith("call_")
    assert (got["usage"] or {}).get("total_tokens") == total


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("vllm_error.sse", "The decoder prompt (length 9000) is longer than the maximum"),
        ("llamacpp_server_error.sse", "Context size has been exceeded."),
    ],
)
async def test_recorded_mid_stream_errors_raise_an_api_error(
    make_proxy: ProxyFactory, backend: Backend, node_sdk: NodeSDK, name: str, message: str
) -> None:
    # one write per event, as backends send them
    events = (FIXTURES / name).read_bytes().split(b"\n\n")
    parts = [e + b"\n\n" for e in events if e.strip()]
    backend.chat(sse_handler(*parts))
    client = await make_proxy(STAND_IN, backend)
    got = await node_sdk.run(base_url(client), "unused", user("hi", stream=True))
    assert not got["ok"], got
    assert got["class"] == "APIError"
    assert message in got["message"]
    assert set(got["error"]) == {"message", "type", "param", "code"}


async def test_recorded_json_reply(
    make_proxy: ProxyFactory, backend: Backend, node_sdk: NodeSDK
) -> None:
    doc = json.loads(
        '{"id":"chatcmpl-1","object":"chat.completion","created":1732000000,'
        '"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{"index":0,"message":'
        '{"role":"assistant","content":"Bonjour","tool_calls":[]},"logprobs":null,'
        '"finish_reason":"stop","stop_reason":null}],"usage":{"prompt_tokens":9,'
        '"total_tokens":12,"completion_tokens":3},"prompt_logprobs":null}'
    )

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(doc)

    backend.chat(handler)
    client = await make_proxy(STAND_IN, backend)
    got = await node_sdk.run(base_url(client), "unused", user("hi"))
    assert got["ok"], got
    assert (got["content"], got["finish_reason"]) == ("Bonjour", "stop")
    assert got["usage"]["total_tokens"] == 12
