"""What a client's request may not do: skip the chain with another Content-Type or
another spelling of the path, or send its body before its key is checked."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from tests import rawhttp
from tests.fixtures import BASIC, Backend, ProxyFactory, json_handler
from tests.rawhttp import error, raw, read_answer

KEY = "sk-edges-limited-1f9a"
FREE = "sk-edges-free-72bc"

CONFIG = (
    BASIC
    + f"""
middleware:
  - type: auth
    keys:
      - id: limited
        key: {KEY}
        scopes: [chat, models]
        models: ["allowed-*"]
      - id: free
        key: {FREE}
        scopes: [chat, models]
  - type: rate_limit
    tokens_per_minute: 100000
  - type: validate
  - type: tool_keywords
    rules:
      - tool: end_call
        keywords: [goodbye]
"""
)

FORCED = (
    BASIC
    + f"""
middleware:
  - type: auth
    keys:
      - id: free
        key: {FREE}
        scopes: [chat]
  - type: model_override
    model: forced-model
"""
)


def request(method: str, target: str, body: bytes = b"", **kwargs: Any) -> bytes:
    kwargs.setdefault("key", KEY)
    return rawhttp.request(method, target, body, **kwargs)


def echo_model(backend: Backend) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        doc = json.loads(await request.read())
        return web.json_response({"object": "list", "model": doc.get("model"), "data": []})

    backend.on("POST", "/v1/completions", handler)
    backend.on("POST", "/v1/embeddings", handler)


# -- 1. a key's policy applies to every body, whatever its Content-Type --

CONTENT_TYPES = [
    None,
    "text/plain",
    "application/x-www-form-urlencoded",
    "application/vnd.api+json",
]


@pytest.mark.parametrize("ctype", CONTENT_TYPES)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/embeddings"])
async def test_the_model_allowlist_holds_whatever_the_content_type(
    make_proxy: ProxyFactory, backend: Backend, ctype: str | None, path: str
) -> None:
    echo_model(backend)
    client = await make_proxy(CONFIG, backend)
    port = client.server.port
    assert port is not None
    body = json.dumps({"model": "forbidden-model", "prompt": "hi", "input": "hi"}).encode()
    status, _, answer = await raw(port, request("POST", path, body, ctype=ctype))
    assert status == 403, answer
    assert error(answer)["code"] == "model_not_allowed"
    assert backend.seen == []  # the backend never got the model the key may not use

    body = json.dumps({"model": "allowed-1", "prompt": "hi", "input": "hi"}).encode()
    status, headers, answer = await raw(port, request("POST", path, body, ctype=ctype))
    assert status == 200, answer
    assert json.loads(answer)["model"] == "allowed-1"
    # the token reservation saw the body too
    assert int(headers["x-ratelimit-remaining-tokens"]) < 100000
    assert [s.path for s in backend.seen] == [path]


@pytest.mark.parametrize("ctype", CONTENT_TYPES)
async def test_a_forced_model_applies_whatever_the_content_type(
    make_proxy: ProxyFactory, backend: Backend, ctype: str | None
) -> None:
    echo_model(backend)
    client = await make_proxy(FORCED, backend)
    port = client.server.port
    assert port is not None
    body = json.dumps({"model": "whatever", "prompt": "hi"}).encode()
    status, _, answer = await raw(
        port, request("POST", "/v1/completions", body, ctype=ctype, key=FREE)
    )
    assert status == 200, answer
    assert backend.seen[-1].json()["model"] == "forced-model"
    assert json.loads(answer)["model"] == "forced-model"


@pytest.mark.parametrize(
    "body", [b"[1, 2]", b'"text"', b"42", b"null", b"model=forbidden-model&prompt=hi", b"\xff\xfe"]
)
async def test_a_body_that_is_not_a_json_object_is_a_400(
    make_proxy: ProxyFactory, backend: Backend, body: bytes
) -> None:
    client = await make_proxy(CONFIG, backend)
    port = client.server.port
    assert port is not None
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        status, _, answer = await raw(port, request("POST", "/v1/embeddings", body, ctype=ctype))
        assert status == 400, answer
        assert error(answer)["code"] == "invalid_json"
    assert backend.seen == []


def form(model: str, boundary: str = "b0undary") -> tuple[str, bytes]:
    parts = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="model"\r\n\r\n'
            f"{model}\r\n"
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + b"RIFF\x00\x01\x02binary\r\n"
        + f"--{boundary}--\r\n".encode()
    )
    return f"multipart/form-data; boundary={boundary}", parts


async def test_a_multipart_form_has_its_model_field_checked(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    async def transcribe(request: web.Request) -> web.StreamResponse:
        return web.json_response({"text": "hello"})

    backend.on("POST", "/v1/audio/transcriptions", transcribe)
    client = await make_proxy(CONFIG, backend)
    port = client.server.port
    assert port is not None
    ctype, body = form("forbidden-model")
    status, _, answer = await raw(
        port, request("POST", "/v1/audio/transcriptions", body, ctype=ctype)
    )
    assert status == 403, answer
    assert error(answer)["code"] == "model_not_allowed"
    assert backend.seen == []

    ctype, body = form("allowed-whisper")
    status, _, answer = await raw(
        port, request("POST", "/v1/audio/transcriptions", body, ctype=ctype)
    )
    assert status == 200, answer
    assert backend.seen[-1].body == body  # forwarded as it came
    assert backend.seen[-1].headers["Content-Type"] == ctype

    # a JSON body that claims to be a form is not one
    claims = json.dumps({"model": "forbidden-model"}).encode()
    status, _, answer = await raw(
        port, request("POST", "/v1/embeddings", claims, ctype="multipart/form-data; boundary=x")
    )
    assert status == 400, answer
    assert error(answer)["code"] == "invalid_form"
    assert len(backend.seen) == 1


# -- 3. paths are normalised before routing --


@pytest.mark.parametrize(
    "target",
    [
        "/v1/../admin",
        "/v1/%2e%2e/admin",
        "/v1/%2E%2E/%2e%2e/admin",
        "/v1/x/..%2f..%2fadmin",
        "/v1/x/%2e%2e%2f%2e%2e%2fadmin",
        "/v1/..",
        "//v1/../../etc/passwd",
    ],
)
async def test_a_path_that_climbs_out_is_a_400(
    make_proxy: ProxyFactory, backend: Backend, target: str
) -> None:
    client = await make_proxy(CONFIG, backend)
    port = client.server.port
    assert port is not None
    status, _, answer = await raw(port, request("GET", target, ctype=None))
    assert status == 400, answer
    assert error(answer)["code"] == "invalid_path"
    assert backend.seen == []


@pytest.mark.parametrize(
    "target",
    [
        "/v1/./chat/completions",
        "//v1/chat/completions",
        "/v1//chat/completions",
        "/v1/chat/./completions",
        "/v1/x/../chat/completions",
        "/v1/%2e/chat/completions",
        "/./chat/completions",
    ],
)
async def test_other_spellings_of_the_chat_path_run_the_whole_chain(
    make_proxy: ProxyFactory, backend: Backend, target: str
) -> None:
    backend.chat(
        json_handler(
            {
                "id": "c",
                "object": "chat.completion",
                "created": 1,
                "model": "allowed-1",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "OK, goodbye!"},
                        "finish_reason": "stop",
                    }
                ],
            }
        )
    )
    client = await make_proxy(CONFIG, backend)
    port = client.server.port
    assert port is not None
    tools = [{"type": "function", "function": {"name": "end_call"}}]
    messages = [{"role": "user", "content": "bye"}]
    # validate runs: a bad temperature never reaches the backend
    bad = json.dumps({"model": "allowed-1", "messages": messages, "temperature": 9}).encode()
    status, _, answer = await raw(port, request("POST", target, bad))
    assert status == 400, answer
    assert error(answer)["param"] == "temperature"
    assert backend.seen == []
    # tool_keywords runs on the answer
    good = json.dumps({"model": "allowed-1", "messages": messages, "tools": tools}).encode()
    status, _, answer = await raw(port, request("POST", target, good))
    assert status == 200, answer
    choice = json.loads(answer)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "end_call"
    assert [s.path for s in backend.seen] == ["/v1/chat/completions"]


async def test_a_passthrough_path_reaches_the_backend_normalised(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    echo_model(backend)
    client = await make_proxy(CONFIG, backend)
    port = client.server.port
    assert port is not None
    body = json.dumps({"model": "allowed-1", "input": "x"}).encode()
    for target in ("/v1//embeddings", "/v1/./embeddings", "/v1/a/b/../../embeddings"):
        status, _, answer = await raw(port, request("POST", target, body))
        assert status == 200, (target, answer)
    assert [s.path for s in backend.seen] == ["/v1/embeddings"] * 3


# -- 11. Expect: 100-continue only after the key is checked --


async def test_expect_continue_is_refused_before_the_body_with_a_wrong_key(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(CONFIG, backend)
    port = client.server.port
    assert port is not None
    body = json.dumps({"model": "allowed-1", "messages": [{"role": "user", "content": "hi"}]})
    for key, status_wanted, code in (("sk-wrong", 401, "invalid_api_key"), (None, 401, None)):
        head = (
            request(
                "POST",
                "/v1/chat/completions",
                body.encode(),
                key=key,
                extra=("Expect: 100-continue",),
            ).split(b"\r\n\r\n")[0]
            + b"\r\n\r\n"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)  # the head only: the body waits for 100 Continue
        await writer.drain()
        status, _, answer = await read_answer(reader, 5)
        writer.close()
        assert status == status_wanted, answer
        if code is not None:
            assert error(answer)["code"] == code
        else:
            assert error(answer)["type"] == "authentication_error"
    assert backend.seen == []


async def test_expect_continue_is_answered_once_the_key_is_good(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(CONFIG, backend)
    port = client.server.port
    assert port is not None
    body = json.dumps({"model": "allowed-1", "messages": [{"role": "user", "content": "hi"}]})
    data = request("POST", "/v1/chat/completions", body.encode(), extra=("Expect: 100-continue",))
    head, _, payload = data.partition(b"\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"\r\n\r\n")
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(payload)
    await writer.drain()
    status, _, answer = await read_answer(reader, 5)
    writer.close()
    assert status == 200, answer
    assert len(backend.seen) == 1
    assert backend.seen[0].json()["messages"][0]["content"] == "hi"

    # a key without the scope is refused before its body too
    data = request("POST", "/v1/sessions", b"{}", key=KEY, extra=("Expect: 100-continue",))
    status, _, answer = await raw(
        port, data.partition(b"\r\n\r\n")[0] + b"\r\n\r\n", read_timeout=5
    )
    assert status == 403, answer
    assert error(answer)["code"] == "missing_scope"
