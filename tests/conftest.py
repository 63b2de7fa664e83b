"""Shared fixtures: a scripted stand-in backend and a proxy built from YAML text."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from proxy.app import build_app
from proxy.config import LoadedConfig
from proxy.loader import load_text

BackendHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    """One request as the backend received it."""

    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Backend:
    """A stand-in OpenAI-compatible backend whose answers each test scripts."""

    server: TestServer | None = None
    seen: list[Seen] = field(default_factory=list)
    routes: dict[tuple[str, str], BackendHandler] = field(default_factory=dict)
    disconnects: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/v1"))

    def on(self, method: str, path: str, handler: BackendHandler) -> None:
        self.routes[(method, path)] = handler

    def chat(self, handler: BackendHandler) -> None:
        self.on("POST", "/v1/chat/completions", handler)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.path, CIMultiDict(request.headers), body))
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            return web.json_response(
                {"error": {"message": "no such route in the stand-in"}}, status=404
            )
        return await handler(request)


def completion(content: str = "Hello!", model: str = "test-model", **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }
    doc.update(extra)
    return doc


def chunk(
    content: str | None = None,
    *,
    index: int = 0,
    finish: str | None = None,
    model: str = "test-model",
    **delta: Any,
) -> bytes:
    d: dict[str, Any] = dict(delta)
    if content is not None:
        d["content"] = content
    doc = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": index, "delta": d, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def usage_chunk(prompt: int = 5, completion_tokens: int = 2, model: str = "test-model") -> bytes:
    doc = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        },
    }
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def sse_handler(*parts: bytes, delay: float = 0.0) -> BackendHandler:
    """A backend handler streaming the given byte parts, one write each."""
    import asyncio

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for part in parts:
            if delay:
                await asyncio.sleep(delay)
            await resp.write(part)
        await resp.write_eof()
        return resp

    return handler


def json_handler(doc: Any, status: int = 200) -> BackendHandler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(doc, status=status)

    return handler


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    b = Backend()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", b._dispatch)
    b.server = TestServer(app)
    await b.server.start_server()
    b.chat(json_handler(completion()))
    b.on(
        "GET",
        "/v1/models",
        json_handler({"object": "list", "data": [{"id": "test-model", "object": "model"}]}),
    )
    yield b
    await b.server.close()


def config_from(
    text: str, backend: Backend | None = None, env: dict[str, str] | None = None
) -> LoadedConfig:
    """A config from YAML text; `{backend}` in it becomes the stand-in's URL."""
    if backend is not None:
        text = text.replace("{backend}", backend.url)
    return load_text(text, env=env or {})


ProxyFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def make_proxy(aiohttp_client: Any) -> ProxyFactory:
    """make_proxy(yaml_text, backend=None, env=None) -> a test client of the proxy."""

    async def factory(
        text: str, backend: Backend | None = None, env: dict[str, str] | None = None
    ) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = await aiohttp_client(
            build_app(config_from(text, backend, env))
        )
        return client

    return factory


BASIC = """
upstreams:
  - name: main
    url: {backend}
    timeouts: {connect: 2, first_byte: 5, idle: 5}
"""


def chat_body(text: str = "Hi", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "test-model", "messages": [{"role": "user", "content": text}]}
    body.update(extra)
    return body


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total
