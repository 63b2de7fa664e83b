"""Sanity tests against the real llama.cpp backend, without the proxy.

What llama-cpp-python[server] 0.3.36 (FastAPI + sse-starlette; NOT llama.cpp's
own C++ ``llama-server``) actually sends, as observed with the tiny model
(``tests/e2e/llama_model.py``) and ``--model_alias tiny-random-llama``:

Non-streaming ``POST /v1/chat/completions`` -> 200 ``application/json``::

    {"id":"chatcmpl-6a93da64-...","object":"chat.completion","created":1795654072,
     "model":"tiny-random-llama","choices":[{"index":0,"message":{"content":
     " test each hello= aHbz","role":"assistant"},"logprobs":null,
     "finish_reason":"length"}],"usage":{"prompt_tokens":38,"completion_tokens":8,
     "total_tokens":46}}

* ``model`` echoes the request's ``model`` verbatim (even an unknown one such as
  ``"nope"``: a single-model server ignores it); without ``model`` in the request
  it is the GGUF *file path*, not the alias. ``/v1/models`` reports the alias.
* Headers: ``server: uvicorn``, ``x-request-id``, ``openai-processing-ms``.
* No ``timings`` object (that is the C++ llama-server's extension), no
  ``system_fingerprint``.

Streaming (``"stream": true``) -> 200 ``text/event-stream; charset=utf-8``,
``Transfer-Encoding: chunked``, ``cache-control: no-store``,
``x-accel-buffering: no``. Events are ``data: <json>`` terminated by ``\\n\\n``
(LF only, never CRLF); JSON uses ``json.dumps`` spacing (``", "`` / ``": "``)::

    data: {"id": "chatcmpl-5f31...", "model": "tiny-random-llama", "created": 1795654072,
           "object": "chat.completion.chunk", "choices": [{"index": 0,
           "delta": {"role": "assistant"}, "logprobs": null, "finish_reason": null}]}
    data: {... "delta": {"content": " now"}, "logprobs": null, "finish_reason": null}]}
    ... one chunk per token (a chunk's content may be "" for a token held back
        as an incomplete UTF-8 sequence) ...
    data: {... "delta": {}, "logprobs": null, "finish_reason": "length"}]}
    data: [DONE]

* First chunk: role only (no ``content`` key). Last JSON chunk: empty delta and
  the finish_reason. Then ``data: [DONE]``.
* ``stream_options: {"include_usage": true}`` is accepted but IGNORED: no chunk
  carries ``usage`` (there is no ``usage`` key at all), so a proxy must count or
  estimate tokens itself for streamed requests. No ``timings`` either.
* sse-starlette sends a comment ``: ping - 2026-11-26 00:48:12.474837+00:00``
  every 15 s while a stream is open (only seen on long generations).

Errors:

* Prompt longer than ``n_ctx`` (512), non-streaming -> 400 ``application/json``::

    {"error":{"message":"This model's maximum context length is 512 tokens. However,
     you requested 4841 tokens (4833 in the messages, 8 in the completion). Please
     reduce the length of the messages or completion.","type":"invalid_request_error",
     "param":"messages","code":"context_length_exceeded"}}

* The same prompt, streaming -> 200 ``text/event-stream`` with an EMPTY body: the
  exception happens after the headers went out, the server logs "Exception in
  ASGI application", ends the chunked body cleanly (``0\\r\\n\\r\\n``) and closes
  the connection. No ``event: error``, no ``data: {"error": ...}``, no
  ``[DONE]`` (``tests/fixtures/sse/llamacpp_error.sse`` is that 0-byte body). The
  same happens for other in-generation errors, e.g. ``"logit_bias": {"abc": 5}``.
* Bad parameter type (``"max_tokens": "lots"``) -> 500 (not 400/422!)::

    {"error":{"message":"1 validation error:\\n  {'type': 'int_parsing', 'loc':
     ('body', 'max_tokens'), 'msg': 'Input should be a valid integer, ...",
     "type":"internal_server_error","param":null,"code":null}}

* Malformed JSON body -> 500 ``text/plain`` ``Internal Server Error``.
* Unknown path -> 404 ``{"detail":"Not Found"}``.
* Not rejected: ``temperature: -5`` (samples inverted logits, slowly),
  out-of-range ``logit_bias`` token ids, ``model`` names that do not exist.
* DANGER: an invalid ``grammar`` (e.g. ``"root ::= foo"``) SEGFAULTS the server
  process (libllama.so) after a 200 stream header; never send one to the shared
  session backend.

Set ``CHAT_PROXY_RECAPTURE_SSE=1`` to overwrite the two ``llamacpp_*.sse``
fixtures with fresh captures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aiohttp

try:
    from .llama_server import LlamaBackend
except ImportError:
    from llama_server import LlamaBackend

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sse"
STREAM_FIXTURE = FIXTURES / "llamacpp_stream.sse"
ERROR_FIXTURE = FIXTURES / "llamacpp_error.sse"
RECAPTURE = os.environ.get("CHAT_PROXY_RECAPTURE_SSE") == "1"

TIMEOUT = aiohttp.ClientTimeout(total=30)
# ~4800 tokens with the tiny model's mostly one-char-per-token vocabulary: > n_ctx=512.
OVERLONG_PROMPT = "hello world " * 400


def _chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a test."},
            {"role": "user", "content": "Say hello."},
        ],
        "max_tokens": 8,
        **extra,
    }


def parse_sse(raw: bytes) -> list[str]:
    """Split a raw SSE body into the payloads of its ``data:`` lines (comments dropped)."""
    payloads: list[str] = []
    for event in raw.decode("utf-8").split("\n\n"):
        data = [line[5:].lstrip(" ") for line in event.split("\n") if line.startswith("data:")]
        if data:
            payloads.append("\n".join(data))
    return payloads


async def _post_raw(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, str, bytes]:
    async with session.post(url, json=body) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


async def test_models_lists_the_alias(llama_backend: LlamaBackend) -> None:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.get(f"{llama_backend.base_url}/models") as resp,
    ):
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [llama_backend.model]
    assert llama_backend.model == "tiny-random-llama"


async def test_chat_completion_non_streaming(llama_backend: LlamaBackend) -> None:
    url = f"{llama_backend.base_url}/chat/completions"
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.post(url, json=_chat_body(llama_backend.model)) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == llama_backend.model
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["message"]["content"]  # the tiny model never emits EOS first
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "timings" not in body


async def test_chat_completion_streaming(llama_backend: LlamaBackend) -> None:
    url = f"{llama_backend.base_url}/chat/completions"
    body = _chat_body(llama_backend.model, stream=True, stream_options={"include_usage": True})
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.post(url, json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        raw = await resp.content.read()

    if RECAPTURE:
        STREAM_FIXTURE.write_bytes(raw)
    assert raw.startswith(b"data: {")
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b"\r" not in raw

    payloads = parse_sse(raw)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["model"] == llama_backend.model for c in chunks)
    # first chunk: the role alone
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    # then one content delta per generated token
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert 0 < len(content) <= 8
    assert "".join(content)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    # last JSON chunk: empty delta + finish_reason
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    # stream_options.include_usage is ignored by llama-cpp-python: no usage, no timings
    assert not any("usage" in c or "timings" in c for c in chunks)


async def test_overlong_prompt_non_streaming_is_400(llama_backend: LlamaBackend) -> None:
    url = f"{llama_backend.base_url}/chat/completions"
    body = {
        "model": llama_backend.model,
        "messages": [{"role": "user", "content": OVERLONG_PROMPT}],
        "max_tokens": 8,
    }
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        status, ctype, raw = await _post_raw(session, url, body)
    assert status == 400
    assert ctype == "application/json"
    error = json.loads(raw)["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages"
    assert "maximum context length is 512 tokens" in error["message"]


async def test_overlong_prompt_streaming_is_empty_200(llama_backend: LlamaBackend) -> None:
    url = f"{llama_backend.base_url}/chat/completions"
    body = {
        "model": llama_backend.model,
        "messages": [{"role": "user", "content": OVERLONG_PROMPT}],
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        status, ctype, raw = await _post_raw(session, url, body)
        if RECAPTURE:
            ERROR_FIXTURE.write_bytes(raw)
        # the server is still healthy afterwards
        async with session.get(f"{llama_backend.base_url}/models") as resp:
            assert resp.status == 200
    assert status == 200
    assert ctype.startswith("text/event-stream")
    assert raw == b""  # headers only: no error event, no [DONE]


async def test_bad_parameter_type_is_500(llama_backend: LlamaBackend) -> None:
    url = f"{llama_backend.base_url}/chat/completions"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        status, _, raw = await _post_raw(
            session, url, _chat_body(llama_backend.model, max_tokens="lots")
        )
    assert status == 500
    error = json.loads(raw)["error"]
    assert error["type"] == "internal_server_error"
    assert "max_tokens" in error["message"]


def test_stored_fixtures_look_like_live_captures() -> None:
    raw = STREAM_FIXTURE.read_bytes()
    payloads = parse_sse(raw)
    assert raw.endswith(b"data: [DONE]\n\n")
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert ERROR_FIXTURE.read_bytes() == b""
