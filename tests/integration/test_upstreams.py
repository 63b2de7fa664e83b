"""Several upstreams: routing, retries, fallback, circuit breaking, pools."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.fixtures import DONE, ProxyFactory, chat_body, chunk, completion

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Stub:
    """A backend that answers with a script of behaviours, one per request."""

    def __init__(self, name: str, *script: str) -> None:
        self.name = name
        self.script = list(script)
        self.hits = 0
        self.active = 0
        self.peak = 0
        self.server: TestServer | None = None

    async def handler(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.hits += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            step = self.script.pop(0) if self.script else "ok"
            if step == "reset":
                assert request.transport is not None
                request.transport.abort()
                return web.Response()
            if step.startswith("status:"):
                _, code, *retry = step.split(":")
                headers = {"Retry-After": retry[0]} if retry else {}
                return web.json_response(
                    {"error": f"{self.name} says {code}"}, status=int(code), headers=headers
                )
            if step == "slow":
                await asyncio.sleep(2)
            if step == "hold":
                await asyncio.sleep(0.3)
            if step == "stall":
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await resp.prepare(request)
                await resp.write(chunk("from " + self.name))
                await asyncio.sleep(2)
                return resp
            return web.json_response(completion(f"from {self.name}"))
        finally:
            self.active -= 1

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handler)
        self.server = TestServer(app)
        await self.server.start_server()
        return str(self.server.make_url("/v1"))


@pytest.fixture
async def stubs() -> Any:
    made: list[Stub] = []

    async def make(name: str, *script: str) -> tuple[Stub, str]:
        stub = Stub(name, *script)
        made.append(stub)
        return stub, await stub.start()

    yield make
    for stub in made:
        assert stub.server is not None
        await stub.server.close()


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def upstream(name: str, url: str, extra: str = "") -> str:
    return f"  - name: {name}\n    url: {url}\n    timeouts: {{connect: 1, first_byte: 0.5, idle: 0.5}}\n{extra}"


RETRY = "    retries: {attempts: 3, backoff_initial: 0.01, backoff_max: 0.05}\n"


@pytest.mark.parametrize("fault", ["status:503", "status:502", "status:504"])
async def test_retry_on_the_same_upstream_before_first_byte(
    make_proxy: ProxyFactory, stubs: Any, fault: str
) -> None:
    stub, url = await stubs("a", fault)
    client = await make_proxy("upstreams:\n" + upstream("a", url, RETRY))
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["message"]["content"] == "from a"
    assert resp.headers["x-upstream"] == "a"
    assert resp.headers["x-upstream-attempts"] == "2"
    assert stub.hits == 2


@pytest.mark.parametrize(("fault", "status"), [("reset", 502), ("slow", 504)])
async def test_a_request_the_backend_took_is_never_sent_again(
    make_proxy: ProxyFactory, stubs: Any, fault: str, status: int
) -> None:
    # the backend read the request, then reset the connection or took too long: it
    # may have run it, so neither a retry nor a fallback sends it again
    a, url_a = await stubs("a", fault)
    b, url_b = await stubs("b")
    client = await make_proxy("upstreams:\n" + upstream("a", url_a, RETRY) + upstream("b", url_b))
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == status
    assert (await resp.json())["error"]["type"] == "api_error"
    assert a.hits == 1 and b.hits == 0


async def test_no_connection_in_time_falls_back(make_proxy: ProxyFactory, stubs: Any) -> None:
    # every place of a's pool is held by a stream: the next request never left, so
    # it goes to b
    a, url_a = await stubs("a", "stall")
    b, url_b = await stubs("b")
    text = "upstreams:\n" + upstream("a", url_a, "    max_connections: 1\n") + upstream("b", url_b)
    client = await make_proxy(text)
    holder = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert holder.status == 200
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 200
    assert resp.headers["x-upstream"] == "b"
    assert a.hits == 1 and b.hits == 1
    await holder.read()


async def test_connection_refused_falls_back_to_next_upstream(
    make_proxy: ProxyFactory, stubs: Any
) -> None:
    b, url_b = await stubs("b")
    text = "upstreams:\n" + upstream("a", _dead_url()) + upstream("b", url_b)
    client = await make_proxy(text)
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=False))
    assert resp.status == 200
    assert resp.headers["x-upstream"] == "b"
    assert b.hits == 1
    assert "127.0.0.1" not in json.dumps(dict(resp.headers))


async def test_no_retry_after_the_first_byte(make_proxy: ProxyFactory, stubs: Any) -> None:
    a, url_a = await stubs("a", "stall")
    b, url_b = await stubs("b")
    text = "upstreams:\n" + upstream("a", url_a, RETRY) + upstream("b", url_b)
    client = await make_proxy(text)
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    body = await resp.read()
    assert body.startswith(chunk("from a"))
    assert b'"upstream_timeout"' in body
    assert a.hits == 1 and b.hits == 0


async def test_client_errors_are_not_retried(make_proxy: ProxyFactory, stubs: Any) -> None:
    a, url_a = await stubs("a", "status:400")
    b, url_b = await stubs("b")
    text = "upstreams:\n" + upstream("a", url_a, RETRY) + upstream("b", url_b)
    client = await make_proxy(text)
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 400
    assert (await resp.json())["error"]["message"] == "a says 400"
    assert a.hits == 1 and b.hits == 0


async def test_429_honours_retry_after_up_to_the_cap(make_proxy: ProxyFactory, stubs: Any) -> None:
    a, url_a = await stubs("a", "status:429:1")
    retry = "    retries: {attempts: 2, backoff_initial: 0.01, backoff_max: 0.01, retry_after_max: 0.3}\n"
    client = await make_proxy("upstreams:\n" + upstream("a", url_a, retry))
    loop = asyncio.get_running_loop()
    started = loop.time()
    resp = await client.post("/v1/chat/completions", json=chat_body())
    waited = loop.time() - started
    assert resp.status == 200
    assert a.hits == 2
    assert 0.25 <= waited < 0.9  # waited the capped Retry-After, not the full second


async def test_last_429_reaches_the_client_with_retry_after(
    make_proxy: ProxyFactory, stubs: Any
) -> None:
    a, url_a = await stubs("a", "status:429:7")
    client = await make_proxy("upstreams:\n" + upstream("a", url_a))
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "7"
    err = (await resp.json())["error"]
    assert err["type"] == "rate_limit_error" and err["message"] == "a says 429"


async def test_all_fail_gives_the_last_error(make_proxy: ProxyFactory, stubs: Any) -> None:
    a, url_a = await stubs("a", "status:503")
    b, url_b = await stubs("b", "status:503")
    client = await make_proxy("upstreams:\n" + upstream("a", url_a) + upstream("b", url_b))
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 503
    assert (await resp.json())["error"] == {
        "message": "b says 503",
        "type": "api_error",
        "param": None,
        "code": None,
    }
    assert a.hits == 1 and b.hits == 1


async def test_circuit_opens_then_recovers(
    make_proxy: ProxyFactory, stubs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, url_a = await stubs("a", "status:503", "status:503")
    b, url_b = await stubs("b")
    circuit = "    circuit: {failures: 2, cooldown: 0.4}\n"
    text = "upstreams:\n" + upstream("a", url_a, circuit) + upstream("b", url_b)
    client = await make_proxy(text)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            resp = await client.post("/v1/chat/completions", json=chat_body())
            assert resp.headers["x-upstream"] == "b"
    assert any(r.getMessage() == "upstream circuit open" for r in caplog.records)
    ready = await (await client.get("/readyz")).json()
    assert ready["upstreams"] == {"a": "open", "b": "ok"}
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.headers["x-upstream"] == "b"
    assert a.hits == 2  # skipped while open
    await asyncio.sleep(0.45)
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.headers["x-upstream"] == "a"  # tried again after the cooldown, and healthy
    assert (await (await client.get("/readyz")).json())["upstreams"]["a"] == "ok"


async def test_every_circuit_open_gives_503_and_readyz_503(
    make_proxy: ProxyFactory, stubs: Any
) -> None:
    a, url_a = await stubs("a", "status:502")
    client = await make_proxy(
        "upstreams:\n" + upstream("a", url_a, "    circuit: {failures: 1, cooldown: 5}\n")
    )
    assert (await client.post("/v1/chat/completions", json=chat_body())).status == 502
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "upstream_unavailable"
    assert (await client.get("/readyz")).status == 503


async def test_weights_balance_between_upstreams(make_proxy: ProxyFactory, stubs: Any) -> None:
    a, url_a = await stubs("a")
    b, url_b = await stubs("b")
    text = (
        "upstreams:\n"
        + upstream("a", url_a, "    weight: 3\n")
        + upstream("b", url_b, "    weight: 1.5\n")
    )
    client = await make_proxy(text)
    for _ in range(120):
        assert (await client.post("/v1/chat/completions", json=chat_body())).status == 200
    assert a.hits + b.hits == 120
    assert 60 <= a.hits <= 100  # expected 80 with weights 3 : 1.5


async def test_connection_pool_is_bounded(make_proxy: ProxyFactory, stubs: Any) -> None:
    a, url_a = await stubs("a", *["hold"] * 6)
    text = f"upstreams:\n  - name: a\n    url: {url_a}\n    max_connections: 2\n"
    client = await make_proxy(text)
    results = await asyncio.gather(
        *(client.post("/v1/chat/completions", json=chat_body()) for _ in range(6))
    )
    assert [r.status for r in results] == [200] * 6
    assert a.peak == 2


async def test_access_log_counts_attempts(
    make_proxy: ProxyFactory, stubs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, url_a = await stubs("a", "status:503")
    b, url_b = await stubs("b")
    client = await make_proxy("upstreams:\n" + upstream("a", url_a) + upstream("b", url_b))
    with caplog.at_level(logging.INFO, logger="chat_proxy.access"):
        await (await client.post("/v1/chat/completions", json=chat_body())).read()
    [rec] = [r for r in caplog.records if r.name == "chat_proxy.access"]
    assert rec.__dict__["attempts"] == 2
    assert rec.__dict__["upstream"] == "b"
    assert rec.__dict__["failures"] == ["a:http_503"]


_ = DONE


async def test_a_dropped_connection_is_tried_once_more_at_once(
    make_proxy: ProxyFactory, stubs: Any
) -> None:
    # a keep-alive connection the backend closed just as the proxy reused it: no byte
    # of an answer came, so it surely never ran the request (Go's net/http resends
    # it too)
    a, url_a = await stubs("a", "ok", "reset")
    client = await make_proxy("upstreams:\n" + upstream("a", url_a))  # attempts: 1
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 200  # the connection is now in the pool
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["message"]["content"] == "from a"
    assert a.hits == 3


async def test_a_fresh_connection_dropped_is_not_tried_again(
    make_proxy: ProxyFactory, stubs: Any
) -> None:
    # the backend took the request on a new connection and closed it: it may have run
    # it, so it is not sent again, whatever the retries say
    a, url_a = await stubs("a", "reset")
    client = await make_proxy("upstreams:\n" + upstream("a", url_a, RETRY))
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_unreachable"
    assert a.hits == 1


async def test_a_second_drop_is_an_error(make_proxy: ProxyFactory, stubs: Any) -> None:
    a, url_a = await stubs("a", "ok", "reset", "reset")
    client = await make_proxy("upstreams:\n" + upstream("a", url_a))
    assert (await client.post("/v1/chat/completions", json=chat_body())).status == 200
    resp = await client.post("/v1/chat/completions", json=chat_body())
    # dropped on the reused connection, then on the fresh one it was resent on
    assert resp.status == 502
    assert a.hits == 3


async def test_a_backend_traceback_is_logged_not_shown(
    make_proxy: ProxyFactory, stubs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, url_a = await stubs("a", "status:500")
    a.name = 'Traceback (most recent call last):\n  File "/srv/app.py", line 3'
    client = await make_proxy("upstreams:\n" + upstream("a", url_a))
    with caplog.at_level(logging.WARNING):
        resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 502
    body = await resp.text()
    assert "Traceback" not in body and "/srv/app.py" not in body
    assert json.loads(body)["error"]["message"] == "The backend failed (status 500)."
    assert any("/srv/app.py" in str(r.__dict__.get("detail")) for r in caplog.records)
