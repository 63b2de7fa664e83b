"""The rate_limit middleware as a client sees it: headers, 429s, concurrency, per-key
limits, routes and its options; with counters in memory and in Redis."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import openai
import pytest
from aiohttp import web

from tests.fixtures import (
    BASIC,
    DONE,
    Backend,
    ProxyFactory,
    chat_body,
    chunk,
    completion,
    json_handler,
    sse_handler,
)
from tests.ratelimit.fixtures import (
    HI_PROMPT,
    STREAM,
    config,
    post,
    refusals,
    usage_handler,
)


async def test_headers_on_every_chat_response(
    make_proxy: ProxyFactory, backend: Backend, store: str
) -> None:
    backend.chat(usage_handler(HI_PROMPT + 10))
    client = await make_proxy(
        config("{requests_per_minute: 3, tokens_per_minute: 1000}", store), backend
    )
    resp = await post(client, chat_body(max_tokens=10))
    assert resp.status == 200
    h = resp.headers
    assert h["x-ratelimit-limit-requests"] == "3"
    assert h["x-ratelimit-remaining-requests"] == "2"
    assert h["x-ratelimit-reset-requests"] == "20s"  # a request comes back every 20 s
    assert h["x-ratelimit-limit-tokens"] == "1000"
    # remaining after this request's reservation: 8 prompt + 10 max_tokens
    assert h["x-ratelimit-remaining-tokens"] == "982"
    assert h["x-ratelimit-reset-tokens"] == "1.08s"  # 18 tokens at 60 ms each
    backend.chat(sse_handler(*STREAM, DONE))
    resp = await post(client, chat_body(stream=True, max_tokens=10))
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["x-ratelimit-remaining-requests"] == "1"


async def test_over_the_request_limit_is_429_with_retry_after(
    make_proxy: ProxyFactory, backend: Backend, store: str
) -> None:
    client = await make_proxy(config("{requests_per_minute: 3}", store), backend)
    refusals_before = await refusals(client, "requests")
    for _ in range(3):
        assert (await post(client)).status == 200
    resp = await post(client)
    assert resp.status == 429
    assert await refusals(client, "requests") == refusals_before + 1
    err = (await resp.json())["error"]
    assert err["type"] == "rate_limit_error"
    assert err["code"] == "rate_limit_exceeded"
    assert "requests per minute (limit 3)" in err["message"]
    assert "client 127.0.0.1" in err["message"]
    # the next request comes back 20 s after the first
    assert resp.headers["Retry-After"] == "20"
    assert 19000 < int(resp.headers["retry-after-ms"]) <= 20000
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(backend.seen) == 3
    # tokens are not limited here: no token headers
    assert "x-ratelimit-limit-tokens" not in resp.headers


async def test_sdk_sees_a_rate_limit_error(
    make_proxy: ProxyFactory, backend: Backend, store: str
) -> None:
    client = await make_proxy(config("{requests_per_minute: 1}", store), backend)
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
    await sdk.chat.completions.create(
        model="test-model", messages=[{"role": "user", "content": "Hi"}]
    )
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "Hi"}]
        )
    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert int(caught.value.response.headers["retry-after"]) == 60
    await sdk.close()


async def test_a_stream_holds_its_concurrency_slot_until_it_ends(
    make_proxy: ProxyFactory, backend: Backend, store: str
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk("first"))
        await asyncio.wait_for(release.wait(), 5)
        await resp.write(chunk(None, finish="stop") + DONE)
        await resp.write_eof()
        return resp

    backend.chat(slow)
    client = await make_proxy(config("{max_concurrent: 1}", store), backend)
    first = await post(client, chat_body(stream=True))
    assert await first.content.readuntil(b"\n\n") == chunk("first")
    resp = await post(client, chat_body(stream=True))
    assert resp.status == 429
    err = (await resp.json())["error"]
    assert "concurrent requests (limit 1 in flight)" in err["message"]
    assert resp.headers["Retry-After"] == "1"
    release.set()
    await first.read()
    backend.chat(json_handler(completion()))
    assert (await post(client)).status == 200
    assert (await post(client)).status == 200  # each one gave its slot back


async def test_a_client_that_disconnects_gives_its_slot_back(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(100):
            await resp.write(chunk("x"))
            await asyncio.sleep(0.05)
        await resp.write_eof()
        return resp

    backend.chat(endless)
    client = await make_proxy(config("{max_concurrent: 1}"), backend)
    resp = await post(client, chat_body(stream=True))
    await resp.content.readuntil(b"\n\n")
    resp.close()
    backend.chat(json_handler(completion()))
    status = 0
    for _ in range(40):  # the proxy notices the disconnect at its next write
        status = (await post(client)).status
        if status == 200:
            break
        await asyncio.sleep(0.05)
    assert status == 200


async def test_a_keys_own_limits_override_the_defaults_field_by_field(
    make_proxy: ProxyFactory, backend: Backend, store: str
) -> None:
    keys = "{big: {requests_per_minute: 4}, tokens_only: {tokens_per_minute: 500}, plain: {}}"
    client = await make_proxy(
        config("{requests_per_minute: 1, tokens_per_minute: 100}", store, keys), backend
    )
    small = chat_body(max_tokens=5)  # 13 tokens of the 100 a minute
    statuses = [(await post(client, small, key="big")).status for _ in range(5)]
    assert statuses == [200, 200, 200, 200, 429]
    resp = await post(client, small, key="tokens_only")
    assert resp.headers["x-ratelimit-limit-requests"] == "1"  # the default
    assert resp.headers["x-ratelimit-limit-tokens"] == "500"  # its own
    assert (await post(client, small, key="tokens_only")).status == 429
    resp = await post(client, small, key="plain")
    assert resp.headers["x-ratelimit-limit-tokens"] == "100"
    resp = await post(client, small, key="plain")
    assert resp.status == 429
    assert "key 'plain'" in (await resp.json())["error"]["message"]
    # anonymous callers have a bucket of their own, per address
    assert (await post(client, small)).status == 200
    assert (await post(client, small)).status == 429


async def test_routes(make_proxy: ProxyFactory, backend: Backend) -> None:
    backend.on(
        "POST",
        "/v1/embeddings",
        json_handler({"object": "list", "data": [], "usage": {"total_tokens": 3}}),
    )
    client = await make_proxy(
        config("{requests_per_minute: 3, tokens_per_minute: 1000, max_concurrent: 1}"), backend
    )
    for _ in range(5):
        assert (await client.get("/healthz")).status == 200  # never limited
    resp = await client.get("/v1/models")  # requests only
    assert resp.status == 200
    assert resp.headers["x-ratelimit-remaining-requests"] == "2"
    assert "x-ratelimit-limit-tokens" not in resp.headers
    resp = await client.post("/v1/embeddings", json={"model": "e", "input": "a few words here"})
    assert resp.status == 200  # passthrough: every limit
    assert resp.headers["x-ratelimit-remaining-requests"] == "1"
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(1000 - (4 + 3))
    assert (await post(client)).status == 200
    resp = await client.get("/v1/models")
    assert resp.status == 429


async def test_on_store_error_is_validated(make_proxy: ProxyFactory, backend: Backend) -> None:
    from proxy.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        await make_proxy(config("{requests_per_minute: 0, on_store_error: maybe}"), backend)
    errors = caught.value.errors
    assert "middleware[1].rate_limit.requests_per_minute: must be a positive integer" in errors
    assert any(
        e.startswith("middleware[1].rate_limit.on_store_error: must be one of") for e in errors
    )


async def test_startup_says_limits_are_per_worker(
    make_proxy: ProxyFactory,
    backend: Backend,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHAT_PROXY_WORKERS", "4")
    with caplog.at_level(logging.INFO, logger="chat_proxy.rate_limit"):
        await make_proxy(config("{requests_per_minute: 3}"), backend)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "rate limits are per worker: with 4 workers a key may get 4 times its limit; use store.backend: redis"
    ]
    caplog.clear()
    monkeypatch.setenv("CHAT_PROXY_WORKERS", "1")
    with caplog.at_level(logging.INFO, logger="chat_proxy.rate_limit"):
        await make_proxy(config("{requests_per_minute: 3}"), backend)
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "counted in this process" in caplog.records[0].getMessage()


async def test_no_limits_keep_the_fast_path(make_proxy: ProxyFactory, backend: Backend) -> None:
    raw = b'{"id":"x","choices":[],  "odd":1.50}'

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=raw, content_type="application/json")

    backend.chat(handler)
    client = await make_proxy(config("{requests_per_minute: 5, max_concurrent: 2}"), backend)
    resp = await post(client)
    assert await resp.read() == raw  # not parsed and re-serialised
    assert json.loads(backend.seen[-1].body) == chat_body()  # stream_options untouched


async def test_limits_of_keys_from_the_auth_middleware(
    make_proxy: ProxyFactory, backend: Backend, store: str
) -> None:
    text = (
        BASIC
        + store
        + """
middleware:
  - type: auth
    keys:
      - {id: web-app, key: sk-web, limits: {requests_per_minute: 2}}
      - {id: batch, key: sk-batch}
  - type: rate_limit
    requests_per_minute: 1
"""
    )
    client = await make_proxy(text, backend)
    base = str(client.make_url("/v1"))
    messages: Any = [{"role": "user", "content": "Hi"}]
    web_app = openai.AsyncOpenAI(base_url=base, api_key="sk-web", max_retries=0)
    batch = openai.AsyncOpenAI(base_url=base, api_key="sk-batch", max_retries=0)
    try:
        for _ in range(2):
            raw = await web_app.chat.completions.with_raw_response.create(
                model="test-model", messages=messages
            )
            assert raw.headers["x-ratelimit-limit-requests"] == "2"
        with pytest.raises(openai.RateLimitError) as caught:
            await web_app.chat.completions.create(model="test-model", messages=messages)
        assert "key 'web-app'" in caught.value.message
        await batch.chat.completions.create(model="test-model", messages=messages)  # its own bucket
        with pytest.raises(openai.RateLimitError):
            await batch.chat.completions.create(model="test-model", messages=messages)
    finally:
        await web_app.close()
        await batch.close()
