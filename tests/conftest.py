"""The shared pytest fixtures: a scripted stand-in backend and a proxy built from YAML
text (their helpers are in tests/fixtures)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import build_app
from tests.fixtures import (
    Backend,
    ProxyFactory,
    completion,
    config_from,
    json_handler,
)


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
