"""The real OpenAI Python SDK as the client, through the proxy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.app import build_app
from proxy.loader import load

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def demo(aiohttp_client: Any) -> openai.AsyncOpenAI:
    client = await aiohttp_client(build_app(load(ROOT / "config/demo.yaml", env={})))
    return openai.AsyncOpenAI(
        base_url=str(client.make_url("/v1")), api_key="demo-key", max_retries=0
    )


async def test_sdk_non_streamed(demo: openai.AsyncOpenAI) -> None:
    resp = await demo.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hello proxy"}]
    )
    assert resp.choices[0].message.content == "You said: hello proxy"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == 4


async def test_sdk_streamed(demo: openai.AsyncOpenAI) -> None:
    stream = await demo.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "stream this please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    finish = None
    usage = None
    async for part in stream:
        if part.choices:
            text += part.choices[0].delta.content or ""
            finish = part.choices[0].finish_reason or finish
        if part.usage:
            usage = part.usage
    assert text == "You said: stream this please"
    assert finish == "stop"
    assert usage is not None and usage.total_tokens > 0


async def test_sdk_raw_response_headers(demo: openai.AsyncOpenAI) -> None:
    raw = await demo.chat.completions.with_raw_response.create(
        model="demo", messages=[{"role": "user", "content": "x"}]
    )
    assert raw.headers["x-request-id"].startswith("req_")


async def test_sdk_sees_not_found_for_unknown_path(demo: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await demo.get("/nope", cast_to=object)
    assert info.value.status_code == 404
