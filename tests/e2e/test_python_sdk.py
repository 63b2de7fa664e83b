"""The OpenAI Python SDK as a client of the proxy: every status of the SPEC's error
table surfaces as the SDK's matching exception carrying the proxy's error; the SDK's
automatic retry after a 429 waits what the proxy's headers say; and completions,
streamed and not, against the real llama.cpp server and recorded backend streams.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from aiohttp import web

try:
    from .llama_server import LlamaBackend, free_port
except ImportError:
    from llama_server import LlamaBackend, free_port

from tests.fixtures import Backend, ProxyFactory, sse_handler

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sse"
KEY = "sk-py-0123456789abcdef"
READER = "sk-py-reader-0123456789"
LIMITED = "sk-py-limited-0123456789"
ENV = {"PY_KEY": KEY, "PY_READER": READER, "PY_LIMITED": LIMITED}

KEYS = """
  - type: auth
    keys:
      - id: main
        key: ${PY_KEY}
        scopes: [chat, models, sessions:read]
      - id: reader
        key: ${PY_READER}
        scopes: [models]
      - id: limited
        key: ${PY_LIMITED}
        limits: {requests_per_minute: 1}
"""

GUARDED = (
    """
server:
  max_body_bytes: 4096
upstreams:
  - name: echo
    url: "echo:"
middleware:
"""
    + KEYS
    + """
  - type: rate_limit
  - type: validate
  - type: session
"""
)

BROKEN = """
upstreams:
  - name: echo
    url: "echo:"
middleware:
  - type: tests.plugins.broken:broken
"""

STAND_IN = """
upstreams:
  - name: main
    url: {backend}
    timeouts: {connect: 2, first_byte: 5, idle: 5}
"""


def sdk(client: Any, key: str = KEY, **options: Any) -> openai.AsyncOpenAI:
    options.setdefault("max_retries", 0)
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=key, **options)


def hello(**extra: Any) -> dict[str, Any]:
    return {"model": "demo", "messages": [{"role": "user", "content": "hello"}], **extra}


async def raises(
    call: Awaitable[Any],
    cls: type[openai.APIStatusError],
    status: int,
    etype: str,
    code: str | None,
    fragment: str,
) -> openai.APIStatusError:
    """Await `call`, which must raise exactly `cls` carrying the proxy's error."""
    with pytest.raises(openai.APIStatusError) as info:
        await call
    exc = info.value
    assert type(exc) is cls, (type(exc), exc)
    assert exc.status_code == status
    body = exc.body
    assert isinstance(body, dict)
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == etype == exc.type
    assert body["code"] == code == exc.code
    assert fragment in body["message"]
    assert body["message"] in exc.message  # "Error code: 4xx - {...}"
    assert exc.request_id  # the proxy's X-Request-Id
    return exc


# -- the error table ---------------------------------------------------------------------


async def test_400_bad_request(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(GUARDED, env=ENV)
    exc = await raises(
        sdk(client).chat.completions.create(**hello(temperature=5)),
        openai.BadRequestError,
        400,
        "invalid_request_error",
        "invalid_value",
        "temperature",
    )
    assert exc.param == "temperature"


async def test_401_authentication(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(GUARDED, env=ENV)
    await raises(
        sdk(client, "sk-wrong").chat.completions.create(**hello()),
        openai.AuthenticationError,
        401,
        "authentication_error",
        "invalid_api_key",
        "API key",
    )


async def test_403_permission_denied(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(GUARDED, env=ENV)
    await raises(
        sdk(client, READER).chat.completions.create(**hello()),
        openai.PermissionDeniedError,
        403,
        "permission_error",
        "missing_scope",
        "Missing scope: chat (key 'reader')",
    )


async def test_404_unknown_session(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(GUARDED, env=ENV)
    await raises(
        sdk(client).get("/sessions/nope", cast_to=object),
        openai.NotFoundError,
        404,
        "invalid_request_error",
        "not_found",
        "nope",
    )


async def test_413_body_too_large(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(GUARDED, env=ENV)
    big = {"model": "demo", "messages": [{"role": "user", "content": "x" * 5000}]}
    await raises(
        sdk(client).chat.completions.create(**big),
        openai.APIStatusError,  # the SDK has no class of its own for 413
        413,
        "invalid_request_error",
        "request_too_large",
        "larger than 4096 bytes",
    )


async def test_429_rate_limited(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(GUARDED, env=ENV)
    limited = sdk(client, LIMITED)
    await limited.chat.completions.create(**hello())
    exc = await raises(
        limited.chat.completions.create(**hello()),
        openai.RateLimitError,
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
        "Rate limit reached for requests per minute (limit 1) on key 'limited'",
    )
    assert int(exc.response.headers["retry-after"]) >= 1
    assert int(exc.response.headers["retry-after-ms"]) > 0


async def test_500_fault_in_a_middleware(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(BROKEN)
    exc = await raises(
        sdk(client).chat.completions.create(**hello()),
        openai.InternalServerError,
        500,
        "api_error",
        "internal_error",
        "The proxy failed to handle this request.",
    )
    assert "ZeroDivisionError" not in exc.message and "Traceback" not in exc.message
    # the same plugin lets a request through when told to
    ok = await sdk(client, default_headers={"X-OK": "1"}).chat.completions.create(**hello())
    assert ok.choices[0].message.content == "You said: hello"


def unreachable_config(port: int, **circuit: int) -> str:
    text = f"""
upstreams:
  - name: gone
    url: http://127.0.0.1:{port}/v1
    timeouts: {{connect: 1, first_byte: 2, idle: 2}}
"""
    if circuit:
        text += f"    circuit: {{failures: {circuit['failures']}, cooldown: 60}}\n"
    return text


async def test_502_backend_unreachable(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(unreachable_config(free_port()))
    await raises(
        sdk(client).chat.completions.create(**hello()),
        openai.InternalServerError,
        502,
        "api_error",
        "upstream_unreachable",
        "The backend is unreachable",
    )


async def test_503_circuit_open(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(unreachable_config(free_port(), failures=1))
    py = sdk(client)
    with pytest.raises(openai.InternalServerError):
        await py.chat.completions.create(**hello())  # the failure that opens the circuit
    await raises(
        py.chat.completions.create(**hello()),
        openai.InternalServerError,
        503,
        "api_error",
        "upstream_unavailable",
        "temporarily unavailable",
    )


async def test_504_backend_too_slow(make_proxy: ProxyFactory, backend: Backend) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3)
        return web.json_response({})

    backend.chat(slow)
    client = await make_proxy(
        STAND_IN.replace("first_byte: 5", "first_byte: 0.3"),
        backend,
    )
    await raises(
        sdk(client).chat.completions.create(**hello()),
        openai.InternalServerError,
        504,
        "api_error",
        "upstream_timeout",
        "did not answer within 0.3 seconds",
    )


# -- the SDK's retry after a 429 ---------------------------------------------------------

RETRY = """
upstreams:
  - name: echo
    url: "echo:"
middleware:
  - type: auth
    keys:
      - id: burst
        key: ${PY_KEY}
        limits: {requests_per_minute: 40}   # 40 at once, then one every 1.5 s
  - type: rate_limit
"""


async def test_sdk_retry_waits_what_retry_after_ms_says(make_proxy: ProxyFactory) -> None:
    """openai-python's `_calculate_retry_timeout` takes `retry-after-ms` first (then
    `retry-after`, in seconds) when it is over 0 and at most 120 s, and sleeps exactly
    that, without the jitter of its own backoff."""
    client = await make_proxy(RETRY, env={"PY_KEY": KEY})
    auth = {"Authorization": f"Bearer {KEY}"}
    for _ in range(40):  # spend the burst (GET /v1/models counts against requests/minute)
        resp = await client.get("/v1/models", headers=auth)
        assert resp.status == 200
    events: list[tuple[str, float, httpx2.Headers | None, int]] = []

    async def on_request(request: httpx2.Request) -> None:
        events.append(("request", time.monotonic(), None, 0))

    async def on_response(response: httpx2.Response) -> None:
        events.append(("response", time.monotonic(), response.headers, response.status_code))

    http = openai.DefaultAsyncHttpxClient(
        event_hooks={"request": [on_request], "response": [on_response]}
    )
    py = sdk(client, max_retries=1, http_client=http)
    reply = await py.chat.completions.create(**hello())
    assert reply.choices[0].message.content == "You said: hello"
    assert [(kind, status) for kind, _, _, status in events] == [
        ("request", 0),
        ("response", 429),
        ("request", 0),
        ("response", 200),
    ]
    refused = events[1][2]
    assert refused is not None
    wait_ms = int(refused["retry-after-ms"])
    assert 500 < wait_ms <= 1500  # one request every 1.5 s, less the time the burst took
    assert refused["retry-after"] == str(math.ceil(wait_ms / 1000))  # whole seconds
    waited = events[2][1] - events[1][1]
    # it slept retry-after-ms (not the rounded-up Retry-After seconds), and then the
    # proxy admitted the retry
    assert wait_ms / 1000 - 0.02 <= waited < wait_ms / 1000 + 0.5
    await http.aclose()


# -- completions against llama and recorded streams --------------------------------------

LLAMA = """
upstreams:
  - name: llama
    url: {llama}
    timeouts: {connect: 2, first_byte: 20, idle: 20}
middleware:
  - type: model_override
    aliases: {junis-orchestrator: "{llama_model}"}
"""


async def test_llama_non_streamed(llama_proxy: ProxyFactory, llama_backend: LlamaBackend) -> None:
    client = await llama_proxy(LLAMA)
    reply = await sdk(client).chat.completions.create(
        model="junis-orchestrator",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
    )
    assert reply.model == llama_backend.model
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 8


async def test_llama_streamed(llama_proxy: ProxyFactory, llama_backend: LlamaBackend) -> None:
    client = await llama_proxy(LLAMA)
    stream = await sdk(client).chat.completions.create(
        model="junis-orchestrator",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    finish = None
    usage = None
    async for part in stream:
        assert part.model == llama_backend.model
        if part.choices:
            text += part.choices[0].delta.content or ""
            finish = part.choices[0].finish_reason or finish
        usage = part.usage or usage
    assert text
    assert finish == "length"
    assert usage is None  # llama never sends a usage chunk


RECORDED = {
    "vllm_stream.sse": ("Hello! How can I help?", "stop", None, 20),
    "ollama_stream.sse": ("Let me check.", "tool_calls", ("get_weather", '{"city":"Paris"}'), 109),
    "openai_tools_n2.sse": ("", "tool_calls", ("get_weather", '{"city":"Paris"}'), 104),
    "llamacpp_server_stream.sse": ("Hi there!", "stop", None, 14),
    "crlf_stream.sse": ("Bonjour à tous", "stop", None, None),
    "llamacpp_stream.sse": (None, "length", None, None),
}


@pytest.mark.parametrize("name", sorted(RECORDED))
async def test_recorded_streams(make_proxy: ProxyFactory, backend: Backend, name: str) -> None:
    content, finish, tool, total = RECORDED[name]
    backend.chat(sse_handler((FIXTURES / name).read_bytes()))
    client = await make_proxy(STAND_IN, backend)
    stream = await sdk(client).chat.completions.create(**hello(stream=True))
    text = ""
    got_finish = None
    usage = None
    calls: dict[int, list[str]] = {}
    async for part in stream:
        usage = part.usage or usage
        for choice in part.choices:
            if choice.index != 0:
                continue
            text += choice.delta.content or ""
            got_finish = choice.finish_reason or got_finish
            for call in choice.delta.tool_calls or ():
                cur = calls.setdefault(call.index, ["", ""])
                if call.function is not None:
                    cur[0] += call.function.name or ""
                    cur[1] += call.function.arguments or ""
    assert text == content if content is not None else text
    assert got_finish == finish
    assert [tuple(c) for c in calls.values()] == ([tool] if tool else [])
    assert (usage.total_tokens if usage else None) == total


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("vllm_error.sse", "The decoder prompt (length 9000) is longer than the maximum"),
        ("llamacpp_server_error.sse", "Context size has been exceeded."),
    ],
)
async def test_recorded_mid_stream_errors_raise_an_api_error(
    make_proxy: ProxyFactory, backend: Backend, name: str, message: str
) -> None:
    events = (FIXTURES / name).read_bytes().split(b"\n\n")
    backend.chat(sse_handler(*[e + b"\n\n" for e in events if e.strip()]))
    client = await make_proxy(STAND_IN, backend)
    stream = await sdk(client).chat.completions.create(**hello(stream=True))
    with pytest.raises(openai.APIError) as info:
        async for _ in stream:
            pass
    assert type(info.value) is openai.APIError
    assert message in info.value.message
    assert isinstance(info.value.body, dict)
    assert set(info.value.body) == {"message", "type", "param", "code"}
