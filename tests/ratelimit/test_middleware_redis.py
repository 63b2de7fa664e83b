"""Redis-backed limits across processes, and what happens when Redis goes away."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.fixtures import BASIC, Backend, ProxyFactory, chat_body, completion
from tests.ratelimit.fixtures import REDIS_URL, drop_keys, require_redis

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until_up(port: int, proc: asyncio.subprocess.Process, log: Path) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            if proc.returncode is not None:
                raise AssertionError(f"the proxy exited: {await asyncio.to_thread(log.read_text)}")
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"the proxy did not start: {await asyncio.to_thread(log.read_text)}")


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    require_redis()
    prefix = f"test-rl-{uuid.uuid4().hex[:8]}:"
    yield prefix
    asyncio.run(drop_keys(prefix))


async def test_two_proxy_processes_enforce_one_limit(tmp_path: Path, redis_prefix: str) -> None:
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(
        f"""
upstreams:
  - name: echo
    url: "echo:"
store: {{backend: redis, url: "{REDIS_URL}", prefix: "{redis_prefix}"}}
middleware:
  - type: tests.ratelimit.fixtures:keyed
  - type: rate_limit
    requests_per_minute: 50
"""
    )
    ports = [free_port(), free_port()]
    procs: list[asyncio.subprocess.Process] = []
    logs = [tmp_path / f"proxy{i}.log" for i in range(2)]
    try:
        for port, log in zip(ports, logs, strict=True):
            with log.open("wb") as out:
                procs.append(
                    await asyncio.create_subprocess_exec(
                        *[
                            sys.executable,
                            "-m",
                            "proxy",
                            "serve",
                            "--config",
                            str(cfg),
                            "--port",
                            str(port),
                        ],
                        cwd=ROOT,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        for port, proc, log in zip(ports, procs, logs, strict=True):
            await wait_until_up(port, proc, log)

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one(i: int, key: str) -> int:
                url = f"http://127.0.0.1:{ports[i % 2]}/v1/chat/completions"
                body = chat_body(f"request {i}", model="echo")
                async with session.post(url, json=body, headers={"X-Test-Key": key}) as resp:
                    await resp.read()
                    return resp.status

            # open the connections (client to proxies, proxies to Redis) under another key,
            # so that the burst below takes well under the 1.2 s in which one request
            # comes back
            await asyncio.gather(*[one(i, "warm-up") for i in range(200)])
            statuses = await asyncio.gather(*[one(i, "burst") for i in range(200)])
        # 100 requests reached each replica: limits counted per process would admit 100
        assert Counter(statuses) == {200: 50, 429: 150}
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


class RedisServer:
    """A redis-server of the test's own, on a port that stays the same across restarts."""

    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI") == "true":
                pytest.fail("redis-server is not installed; CI=true requires it")
            pytest.skip("redis-server is not installed: install it to run the store-failure tests")
        self.binary = binary
        self.tmp = tmp
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *[
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            cwd=self.tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                await writer.wait_closed()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise AssertionError("redis-server did not start")

    async def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 10)
            self.proc = None


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path)
    await server.start()
    yield server
    await server.stop()


def store_config(server: RedisServer, policy: str) -> str:
    return (
        BASIC
        + f"""
store: {{backend: redis, url: "{server.url}", prefix: "t:"}}
middleware:
  - type: rate_limit
    requests_per_minute: 3
    on_store_error: {policy}
"""
    )


async def until_limited(client: Any) -> list[int]:
    """Requests until one is refused with 429 (bounded); the statuses seen."""
    statuses: list[int] = []
    for _ in range(60):
        resp = await client.post("/v1/chat/completions", json=chat_body())
        statuses.append(resp.status)
        if resp.status == 429:
            assert resp.headers["x-ratelimit-remaining-requests"] == "0"
            break
        await asyncio.sleep(0.05)
    return statuses


def store_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "chat_proxy.rate_limit" and r.levelno == logging.WARNING
    ]


async def test_store_down_allow_lets_requests_through_then_limits_return(
    make_proxy: ProxyFactory,
    backend: Backend,
    own_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await make_proxy(store_config(own_redis, "allow"), backend)
    assert await until_limited(client) == [200, 200, 200, 429]
    await own_redis.stop()
    with caplog.at_level(logging.WARNING, logger="chat_proxy.rate_limit"):
        statuses = [
            (await client.post("/v1/chat/completions", json=chat_body())).status for _ in range(20)
        ]
    assert statuses == [200] * 20
    warnings = store_warnings(caplog)
    assert warnings == [
        "rate-limit store unreachable; requests are let through unlimited (on_store_error: allow)"
    ]
    await own_redis.start()  # empty: the counts start again
    statuses = await until_limited(client)
    assert statuses[-1] == 429 and set(statuses) == {200, 429}
    assert statuses[-4:] == [200, 200, 200, 429]


async def test_store_down_deny_refuses_with_503_then_limits_return(
    make_proxy: ProxyFactory,
    backend: Backend,
    own_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await make_proxy(store_config(own_redis, "deny"), backend)
    assert (await client.post("/v1/chat/completions", json=chat_body())).status == 200
    await own_redis.stop()
    seen = len(backend.seen)
    with caplog.at_level(logging.WARNING, logger="chat_proxy.rate_limit"):
        for _ in range(10):
            resp = await client.post("/v1/chat/completions", json=chat_body())
            assert resp.status == 503
            err = (await resp.json())["error"]
            assert err["type"] == "api_error"
            assert err["code"] == "rate_limit_store_unavailable"
            assert "store is unreachable" in err["message"]
    assert len(backend.seen) == seen
    assert len(store_warnings(caplog)) == 1
    await own_redis.start()
    statuses = await until_limited(client)
    assert set(statuses) <= {503, 200, 429}
    assert statuses[-4:] == [200, 200, 200, 429]


async def test_store_dying_during_a_request_never_fails_it(
    make_proxy: ProxyFactory,
    backend: Backend,
    own_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def kills_redis(request: web.Request) -> web.StreamResponse:
        await own_redis.stop()  # admitted with Redis up; settled with Redis gone
        return web.json_response(completion())

    backend.chat(kills_redis)
    text = store_config(own_redis, "allow").replace(
        "requests_per_minute: 3",
        "requests_per_minute: 3\n    tokens_per_minute: 1000\n    max_concurrent: 2",
    )
    client = await make_proxy(text, backend)
    with caplog.at_level(logging.WARNING, logger="chat_proxy.rate_limit"):
        resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=5))
        assert resp.status == 200
        assert resp.headers["x-ratelimit-remaining-requests"] == "2"
        assert (await resp.json())["object"] == "chat.completion"
        for _ in range(40):  # the settle runs once the response has gone out
            if store_warnings(caplog):
                break
            await asyncio.sleep(0.05)
    assert store_warnings(caplog) == [
        "rate-limit store unreachable; a finished request was not settled"
    ]
