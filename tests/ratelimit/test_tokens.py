"""Tokens through the rate_limit middleware: the estimate at admission, settling
against the usage a response reports, and the usage chunk of a stream; with counters
in memory and in Redis."""

from __future__ import annotations

from tests.fixtures import (
    DONE,
    Backend,
    ProxyFactory,
    chat_body,
    json_handler,
    sse_handler,
    usage_chunk,
)
from tests.ratelimit.fixtures import (
    HI_PROMPT,
    STREAM,
    config,
    post,
    usage_handler,
)


async def test_tokens_settle_against_the_reported_usage(
    make_proxy: ProxyFactory, backend: Backend, store: str
) -> None:
    # 100 tokens a minute: one comes back every 600 ms, so the test's own time does not count
    backend.chat(usage_handler(7))
    client = await make_proxy(config("{tokens_per_minute: 100}", store), backend)
    resp = await post(client, chat_body(max_tokens=50))
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(100 - HI_PROMPT - 50)
    # the first used 7 tokens: 93 left, and this one reserves 58 of them
    resp = await post(client, chat_body(max_tokens=50))
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(93 - 58)

    backend.chat(usage_handler(90))  # more than reserved: the difference is charged
    resp = await post(client, chat_body(max_tokens=1))
    assert resp.status == 200
    resp = await post(client, chat_body(max_tokens=1))
    assert resp.status == 429
    err = (await resp.json())["error"]
    assert "tokens per minute (limit 100" in err["message"]


async def test_a_request_that_would_itself_exceed_the_tokens_left_is_refused(
    make_proxy: ProxyFactory, backend: Backend, store: str
) -> None:
    backend.chat(usage_handler(HI_PROMPT + 50))
    client = await make_proxy(config("{tokens_per_minute: 100}", store), backend)
    assert (await post(client, chat_body(max_tokens=50))).status == 200  # 42 left
    resp = await post(client, chat_body(max_tokens=40))  # needs 48
    assert resp.status == 429
    err = (await resp.json())["error"]
    assert "remaining 42, this request needs about 48" in err["message"]
    assert resp.headers["x-ratelimit-remaining-tokens"] == "42"
    assert int(resp.headers["Retry-After"]) == 4  # 6 tokens short, 600 ms each
    assert (await post(client, chat_body(max_tokens=30))).status == 200  # needs 38
    assert len(backend.seen) == 2


async def test_a_request_larger_than_the_whole_budget_says_so(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(config("{tokens_per_minute: 1000}"), backend)
    resp = await post(client, chat_body(max_tokens=2000))
    assert resp.status == 429
    err = (await resp.json())["error"]
    assert err["code"] == "rate_limit_exceeded"
    assert err["message"].startswith("Request too large for tokens per minute")
    assert "2008 tokens" in err["message"] and "limit on client 127.0.0.1 is 1000" in err["message"]
    assert "Retry-After" not in resp.headers  # waiting cannot help
    # a prompt alone over the budget, with no max_tokens
    resp = await post(client, chat_body("x" * 8000))
    assert resp.status == 429
    assert "Request too large" in (await resp.json())["error"]["message"]
    assert backend.seen == []
    # without max_tokens, only the default completion budget is trimmed to fit
    resp = await post(client, chat_body("x" * 2000))
    assert resp.status == 200
    assert resp.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_stream_usage_is_requested_and_hidden_from_a_client_that_did_not_ask(
    make_proxy: ProxyFactory, backend: Backend, store: str
) -> None:
    backend.chat(sse_handler(*STREAM, usage_chunk(prompt=5, completion_tokens=2), DONE))
    client = await make_proxy(config("{tokens_per_minute: 100}", store), backend)
    resp = await post(client, chat_body(stream=True, max_tokens=50))
    assert resp.status == 200
    assert await resp.read() == b"".join(STREAM) + DONE  # byte for byte, minus the usage chunk
    sent = backend.seen[-1].json()
    assert sent["stream_options"] == {"include_usage": True}
    # the stream used 7 tokens: settled before the next request
    resp = await post(client, chat_body(max_tokens=50))
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(93 - 58)


async def test_stream_usage_kept_for_a_client_that_asked(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    parts = [*STREAM, usage_chunk(prompt=5, completion_tokens=2), DONE]
    backend.chat(sse_handler(*parts))
    client = await make_proxy(config("{tokens_per_minute: 100}"), backend)
    body = chat_body(stream=True, max_tokens=10, stream_options={"include_usage": True})
    resp = await post(client, body)
    assert await resp.read() == b"".join(parts)
    assert backend.seen[-1].json()["stream_options"] == {"include_usage": True}
    # other stream options are kept beside the one the proxy adds
    body = chat_body(stream=True, max_tokens=10, stream_options={"continuous_usage_stats": False})
    resp = await post(client, body)
    assert await resp.read() == b"".join(STREAM) + DONE
    assert backend.seen[-1].json()["stream_options"] == {
        "continuous_usage_stats": False,
        "include_usage": True,
    }


async def test_stream_without_usage_is_settled_from_its_text(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    # a backend that ignores include_usage: the reply's 11 characters are about 3 tokens
    backend.chat(sse_handler(*STREAM, DONE))
    client = await make_proxy(config("{tokens_per_minute: 100}"), backend)
    resp = await post(client, chat_body(stream=True, max_tokens=50))
    assert await resp.read() == b"".join(STREAM) + DONE
    resp = await post(client, chat_body(max_tokens=50))
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(100 - (HI_PROMPT + 3) - 58)


async def test_failed_request_gives_its_tokens_back(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    backend.chat(json_handler({"error": {"message": "bad model"}}, status=400))
    client = await make_proxy(config("{tokens_per_minute: 100}"), backend)
    resp = await post(client, chat_body(max_tokens=50))
    assert resp.status == 400
    backend.chat(usage_handler(10))
    resp = await post(client, chat_body(max_tokens=50))
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(100 - 58)
