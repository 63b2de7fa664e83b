"""Faults behind the whole chain: a backend that refuses, resets, stalls or sends
malformed streams; the Redis store going away and coming back; the SQLite file
becoming unwritable. Each gives a clean error or keeps serving, and leaves nothing
behind: no stream counted in flight, no file descriptor, no task."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.fixtures import DONE, Backend, ProxyFactory, chunk, completion, usage_chunk
from tests.hardening.fixtures import (
    ALICE,
    ROOT,
    assert_no_traceback,
    assert_openai_error,
    free_port,
    full_chain,
    metric,
    sqlite_store,
)

AUTH = {"Authorization": f"Bearer {ALICE}"}
FAST = "{connect: 1, first_byte: 0.5, idle: 0.5}"
Client = TestClient[Any, Any]


def body(text: str = "Hi", **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": "test-model", "messages": [{"role": "user", "content": text}]}
    doc.update(extra)
    return doc


# -- what is left behind --


@dataclass
class Levels:
    fds: int
    tasks: int

    @staticmethod
    def now() -> Levels:
        return Levels(len(os.listdir("/proc/self/fd")), len(asyncio.all_tasks()))


async def streams_in_flight(client: Client) -> float:
    resp = await client.get("/metrics")
    return metric(await resp.text(), "chat_proxy_streams_in_flight")


async def baseline(client: Client) -> Levels:
    """The levels once the client, the proxy and the backend hold their usual
    connections (a normal request and a scrape have been made)."""
    resp = await client.post("/v1/chat/completions", json=body("warm up"), headers=AUTH)
    assert resp.status == 200, await resp.text()
    await resp.read()
    assert await streams_in_flight(client) == 0
    gc.collect()
    await asyncio.sleep(0.05)
    return Levels.now()


async def assert_nothing_left(client: Client, before: Levels, settle: float = 5.0) -> None:
    deadline = time.monotonic() + settle
    while True:
        gc.collect()
        streams = await streams_in_flight(client)
        now = Levels.now()
        if streams == 0 and now.fds <= before.fds and now.tasks <= before.tasks:
            return
        if time.monotonic() > deadline:
            names = sorted(t.get_name() + ":" + repr(t.get_coro()) for t in asyncio.all_tasks())
            raise AssertionError(f"left behind: streams={streams} {now} vs {before}; {names}")
        await asyncio.sleep(0.1)


async def wait_closed(request: web.Request, limit: float = 10.0) -> None:
    """Hold a backend handler until the proxy closes the connection (bounded)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(0.02)


def sse_start(request: web.Request) -> web.StreamResponse:
    return web.StreamResponse(headers={"Content-Type": "text/event-stream"})


def events(raw: bytes) -> list[Any]:
    """The JSON payloads of a stream's data events ([DONE] as the string)."""
    out: list[Any] = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                data = line[6:]
                out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


@pytest.fixture
async def chained(
    make_proxy: ProxyFactory, backend: Backend, tmp_path: Path
) -> AsyncIterator[Client]:
    client = await make_proxy(
        full_chain("{backend}", sqlite_store(tmp_path / "s.db"), timeouts=FAST), backend
    )
    yield client


# -- the backend --


async def test_backend_refuses_connections(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    client = await make_proxy(
        full_chain(
            f"http://127.0.0.1:{free_port()}/v1", sqlite_store(tmp_path / "s.db"), timeouts=FAST
        )
    )
    await streams_in_flight(client)
    before = Levels.now()
    for stream in (False, True, False):
        resp = await client.post("/v1/chat/completions", json=body(stream=stream), headers=AUTH)
        assert resp.status == 502
        err = assert_openai_error(await resp.read(), 502)
        assert err["code"] == "upstream_unreachable"
    await assert_nothing_left(client, before)


async def test_backend_resets_before_answering(chained: Client, backend: Backend) -> None:
    before = await baseline(chained)

    async def reset(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    backend.chat(reset)
    for stream in (False, True):
        resp = await chained.post("/v1/chat/completions", json=body(stream=stream), headers=AUTH)
        assert resp.status == 502
        assert_openai_error(await resp.read(), 502)
    await assert_nothing_left(chained, before)


async def test_backend_resets_mid_stream(chained: Client, backend: Backend) -> None:
    before = await baseline(chained)

    async def broken(request: web.Request) -> web.StreamResponse:
        resp = sse_start(request)
        await resp.prepare(request)
        await resp.write(chunk("partial"))
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return resp

    backend.chat(broken)
    resp = await chained.post("/v1/chat/completions", json=body(stream=True), headers=AUTH)
    assert resp.status == 200
    got = events(await resp.read())
    assert got[0]["choices"][0]["delta"]["content"] == "partial"
    assert got[-1]["error"]["code"] == "upstream_reset"
    await assert_nothing_left(chained, before)


async def test_backend_stalls_before_the_first_byte(chained: Client, backend: Backend) -> None:
    before = await baseline(chained)

    async def stall(request: web.Request) -> web.StreamResponse:
        await wait_closed(request)
        return web.json_response({})

    backend.chat(stall)
    for stream in (False, True):
        resp = await chained.post("/v1/chat/completions", json=body(stream=stream), headers=AUTH)
        assert resp.status == 504
        assert assert_openai_error(await resp.read(), 504)["code"] == "upstream_timeout"
    await assert_nothing_left(chained, before)


async def test_backend_stalls_mid_stream_and_never_ends(chained: Client, backend: Backend) -> None:
    """A stream that stops sending without ending is closed by the idle timeout."""
    before = await baseline(chained)

    async def never_ends(request: web.Request) -> web.StreamResponse:
        resp = sse_start(request)
        await resp.prepare(request)
        await resp.write(chunk("one") + chunk(" two"))
        await wait_closed(request)
        return resp

    backend.chat(never_ends)
    started = time.monotonic()
    resp = await chained.post("/v1/chat/completions", json=body(stream=True), headers=AUTH)
    got = events(await resp.read())
    assert time.monotonic() - started < 5
    assert [e["choices"][0]["delta"]["content"] for e in got[:2]] == ["one", " two"]
    assert got[-1]["error"]["code"] == "upstream_timeout"
    await assert_nothing_left(chained, before)


async def test_client_goes_away_from_an_endless_stream(chained: Client, backend: Backend) -> None:
    before = await baseline(chained)
    gone = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = sse_start(request)
        await resp.prepare(request)
        try:
            for i in range(10_000):  # bounded: about 20 s
                await resp.write(chunk(f"w{i} "))
                await asyncio.sleep(0.002)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
        finally:
            gone.set()
        return resp

    backend.chat(endless)
    for _ in range(3):
        gone.clear()
        resp = await chained.post("/v1/chat/completions", json=body(stream=True), headers=AUTH)
        await resp.content.readuntil(b"\n\n")
        await resp.content.readuntil(b"\n\n")
        assert resp.connection is not None and resp.connection.transport is not None
        resp.connection.transport.abort()
        resp.close()
        await asyncio.wait_for(gone.wait(), 5)  # the backend was let go at once
    await assert_nothing_left(chained, before)


GARBAGE_STREAMS: dict[str, list[bytes]] = {
    "binary": [bytes(range(256)) * 4, b"\n\n", b"\xff\xfe\x00data: \x80\x81\n\n", DONE],
    "invalid JSON": [b"data: {not json\n\n", b'data: {"choices": \n\n', chunk("ok"), DONE],
    "wrong shapes": [
        b"data: []\n\n",
        b"data: null\n\n",
        b"data: 42\n\n",
        b'data: "text"\n\n',
        b'data: {"choices": 5}\n\n',
        b'data: {"choices": "abc"}\n\n',
        b'data: {"choices": [5, null, "x"]}\n\n',
        b'data: {"choices": [{"index": "0", "delta": "text"}]}\n\n',
        b'data: {"choices": [{"index": 0, "delta": {"content": 7, "tool_calls": 3}}]}\n\n',
        b'data: {"choices": [{"index": 0, "delta": {"tool_calls": [5, {"index": "x"}]}}]}\n\n',
        b'data: {"choices": [{"index": 0, "delta": {"content": "goodbye"}, "finish_reason": 9}]}\n\n',
        b'data: {"usage": "lots", "choices": []}\n\n',
        b'data: {"usage": {"prompt_tokens": "x", "completion_tokens": -5}, "choices": []}\n\n',
        b'data: {"error": 5}\n\n',
        chunk("ok"),
        DONE,
    ],
    "lone surrogate": [
        b'data: {"model": "m\\udc00", "choices": [{"index": 0, "delta": {"content": "\\ud800"}}]}\n\n',
        # tool_keywords copies the chunk's fields into the tool call chunk it adds
        b'data: {"model": "m\\udc00", "choices": [{"index": 0, "delta": {"content": " goodbye"}}]}\n\n',
        b'data: {"model": "m\\udc00", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n',
        DONE,
    ],
    "odd fields": [b"event: \xff\nid: \x00\nretry: x\nfoo: bar\ndata: [DONE]\n\n"],
    "no blank line at the end": [chunk("ok"), b"data: [DONE]"],
    "comments only": [b": ping\n\n" * 50, DONE],
}


@pytest.mark.parametrize("name", list(GARBAGE_STREAMS))
async def test_malformed_streams(chained: Client, backend: Backend, name: str) -> None:
    before = await baseline(chained)
    backend.chat(_sse(*GARBAGE_STREAMS[name]))
    for tools in (False, True):  # tools: tool_keywords reads every event
        extra: dict[str, Any] = {"stream": True}
        if tools:
            extra["tools"] = [{"type": "function", "function": {"name": "end_call"}}]
        resp = await chained.post("/v1/chat/completions", json=body(**extra), headers=AUTH)
        raw = await resp.read()
        assert_no_traceback(raw)
        assert resp.status in (200, 502), raw[:500]
        if resp.status == 502:
            assert_openai_error(raw, 502)
            continue
        # the garbage is relayed or dropped, never a fault of the proxy, and the
        # stream runs to the backend's end
        assert b"internal_error" not in raw, raw[-500:]
        assert raw.endswith(b"data: [DONE]\n\n") or raw.endswith(b"data: [DONE]"), raw[-300:]
    await assert_nothing_left(chained, before)
    # and the proxy still serves
    backend.chat(_sse(chunk("fine"), DONE))
    resp = await chained.post("/v1/chat/completions", json=body(stream=True), headers=AUTH)
    assert events(await resp.read())[0]["choices"][0]["delta"]["content"] == "fine"


def _sse(*parts: bytes) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = sse_start(request)
        await resp.prepare(request)
        for part in parts:
            await resp.write(part)
        await resp.write_eof()
        return resp

    return handler


GARBAGE_BODIES: dict[str, bytes] = {
    "not JSON": b"{oops",
    "binary": bytes(range(256)),
    "a list": b"[1, 2]",
    "wrong shapes": b'{"choices": [5, {"message": "x"}, {"message": {"content": 5}}], "usage": 3}',
    "choices not a list": b'{"choices": {"a": 1}, "model": 5}',
    "lone surrogate": b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "\\ud800 goodbye"}}]}',
    "deep nesting": b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
}


@pytest.mark.parametrize("name", list(GARBAGE_BODIES))
async def test_malformed_json_answers(chained: Client, backend: Backend, name: str) -> None:
    before = await baseline(chained)

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(body=GARBAGE_BODIES[name], content_type="application/json")

    backend.chat(answer)
    for tools in (False, True):
        extra: dict[str, Any] = {}
        if tools:
            extra["tools"] = [{"type": "function", "function": {"name": "end_call"}}]
        resp = await chained.post("/v1/chat/completions", json=body(**extra), headers=AUTH)
        raw = await resp.read()
        assert_no_traceback(raw)
        assert resp.status in (200, 502), raw[:500]
    await assert_nothing_left(chained, before)


async def test_an_endless_line_is_cut_at_16_mib(chained: Client, backend: Backend) -> None:
    """A backend that never ends its line: the parsed relay holds at most 16 MiB of
    it, then ends the stream with an error event and closes the backend connection."""
    before = await baseline(chained)
    piece = b"x" * 65536
    sent = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = sse_start(request)
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"delta": {"content": "')
        with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
            while sent < 64 * 1024 * 1024:  # bounded: stops by itself
                await resp.write(piece)
                sent += len(piece)
        return resp

    backend.chat(endless)
    resp = await chained.post("/v1/chat/completions", json=body(stream=True), headers=AUTH)
    assert resp.status == 200
    raw = await resp.read()
    assert_no_traceback(raw)
    got = events(raw)
    assert got[-1]["error"]["code"] == "upstream_bad_response"
    assert "larger than 16 MiB" in got[-1]["error"]["message"]
    assert 16 * 1024 * 1024 <= sent < 64 * 1024 * 1024
    await assert_nothing_left(chained, before)


async def test_a_10_mb_event(chained: Client, backend: Backend) -> None:
    before = await baseline(chained)
    text = "0123456789abcdef" * (10 * 1024 * 1024 // 16)
    big = chunk(text)

    async def huge(request: web.Request) -> web.StreamResponse:
        resp = sse_start(request)
        await resp.prepare(request)
        for i in range(0, len(big), 65536):
            await resp.write(big[i : i + 65536])
        await resp.write(chunk("", finish="stop") + usage_chunk() + DONE)
        await resp.write_eof()
        return resp

    backend.chat(huge)
    resp = await chained.post("/v1/chat/completions", json=body(stream=True), headers=AUTH)
    got = events(await resp.read())
    assert got[0]["choices"][0]["delta"]["content"] == text
    assert got[-1] == "[DONE]"
    sid = resp.headers["X-Session-Id"]
    await asyncio.sleep(0.3)
    turn = (await (await chained.get(f"/v1/sessions/{sid}", headers=AUTH)).json())["turns"][0]
    assert turn["response"]["content"] == text
    await assert_nothing_left(chained, before)


# -- the Redis store --


async def echo(request: web.Request) -> web.StreamResponse:
    """A backend answering with the last message, streamed when asked."""
    doc = await request.json()
    text = "You said: " + str(doc["messages"][-1]["content"])
    if not doc.get("stream"):
        return web.json_response(completion(text))
    return await _sse(chunk(text), chunk(finish="stop"), usage_chunk(), DONE)(request)


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    client.close()
                    return
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(free_port())
    server.start()
    yield server
    server.kill()


async def test_redis_goes_away_and_comes_back(
    make_proxy: ProxyFactory,
    backend: Backend,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = f'{{backend: redis, url: "redis://127.0.0.1:{redis_server.port}/0", prefix: "hard:"}}'
    backend.chat(echo)
    client = await make_proxy(full_chain("{backend}", store, timeouts=FAST), backend)
    before = await baseline(client)
    resp = await client.post("/v1/chat/completions", json=body("one"), headers=AUTH)
    sid = resp.headers["X-Session-Id"]
    await resp.read()
    await asyncio.sleep(0.2)
    assert (await client.get(f"/v1/sessions/{sid}", headers=AUTH)).status == 200

    redis_server.kill()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for stream in (False, True):  # chat keeps working: limits let through, turns kept
            started = time.monotonic()
            resp = await client.post(
                "/v1/chat/completions", json=body("while down", stream=stream), headers=AUTH
            )
            assert resp.status == 200
            raw = await resp.read()
            assert time.monotonic() - started < 5
            assert b"while down" in raw
        ready = await client.get("/readyz")
        assert ready.status == 503 and (await ready.json())["store"] == "down"
        for path in ("/v1/sessions", f"/v1/sessions/{sid}"):
            resp = await client.get(path, headers=AUTH)
            assert resp.status == 503, await resp.text()
            assert assert_openai_error(await resp.read(), 503)["code"] == "store_unavailable"
        await asyncio.sleep(0.5)  # the writer finds the store away and keeps the turns
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "session store unavailable" in logged and "keeping the turns" in logged
    assert "rate-limit store unreachable" in logged

    redis_server.start()
    deadline = time.monotonic() + 10
    while (await client.get("/readyz")).status != 200:
        assert time.monotonic() < deadline, "the store never came back"
        await asyncio.sleep(0.1)
    resp = await client.post("/v1/chat/completions", json=body("two"), headers=AUTH)
    assert resp.status == 200
    sid2 = resp.headers["X-Session-Id"]
    await resp.read()
    await asyncio.sleep(0.2)
    resp = await client.get(f"/v1/sessions/{sid2}", headers=AUTH)
    assert resp.status == 200 and (await resp.json())["turn_count"] == 1
    await assert_nothing_left(client, before)


# -- the SQLite file --


def _chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[Any]:
    """immutable(dir) makes a directory and the files in it unwritable, even for
    root (the immutable attribute), except SQLite's `-shm` file: that one is mapped in
    memory, and a write to a mapped page of an immutable file is a SIGBUS, which a
    read-only disk never causes (the index it holds is not data). Undone at the end."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    probe = tmp_path / "probe"
    probe.write_text("x")
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem or user cannot set the immutable attribute")
    _chattr("-i", probe)
    locked: list[Path] = []

    def lock(directory: Path) -> None:
        paths = [*sorted(p for p in directory.iterdir() if not p.name.endswith("-shm")), directory]
        _chattr("+i", *paths)
        locked.extend(paths)

    def unlock() -> None:
        if locked:
            _chattr("-i", *locked)
            locked.clear()

    lock.unlock = unlock  # type: ignore[attr-defined]
    yield lock
    unlock()


async def test_sqlite_file_becomes_read_only(
    make_proxy: ProxyFactory,
    backend: Backend,
    tmp_path: Path,
    immutable: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    backend.chat(echo)
    client = await make_proxy(
        full_chain("{backend}", sqlite_store(data / "s.db"), timeouts=FAST), backend
    )
    before = await baseline(client)
    resp = await client.post("/v1/chat/completions", json=body("kept"), headers=AUTH)
    kept = resp.headers["X-Session-Id"]
    await resp.read()
    await asyncio.sleep(0.2)

    immutable(data)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resp = await client.post("/v1/chat/completions", json=body("lost"), headers=AUTH)
        assert resp.status == 200
        lost = resp.headers["X-Session-Id"]
        await resp.read()
        resp = await client.post(
            "/v1/chat/completions", json=body("lost too", stream=True), headers=AUTH
        )
        assert resp.status == 200 and (await resp.read()).endswith(DONE)
        await asyncio.sleep(0.6)  # the writer tries three times, then logs
        # reads still work
        resp = await client.get(f"/v1/sessions/{kept}", headers=AUTH)
        assert resp.status == 200 and (await resp.json())["turn_count"] == 1
        assert (await client.get(f"/v1/sessions/{lost}", headers=AUTH)).status == 404
        # a delete cannot be written: 503, and the session is still there
        resp = await client.delete(f"/v1/sessions/{kept}", headers=AUTH)
        assert resp.status == 503
        assert assert_openai_error(await resp.read(), 503)["code"] == "store_unavailable"
        assert (await client.get(f"/v1/sessions/{kept}", headers=AUTH)).status == 200
    failed = [r for r in caplog.records if "session store write failed" in r.getMessage()]
    assert failed
    # the log names the cause, not a failed rollback after it
    assert failed[0].exc_info is not None
    assert "disk I/O error" in str(failed[0].exc_info[1]), failed[0].exc_info

    immutable.unlock()
    resp = await client.post("/v1/chat/completions", json=body("back"), headers=AUTH)
    back = resp.headers["X-Session-Id"]
    await resp.read()
    await asyncio.sleep(0.2)
    resp = await client.get(f"/v1/sessions/{back}", headers=AUTH)
    assert resp.status == 200 and (await resp.json())["turn_count"] == 1
    await assert_nothing_left(client, before)


async def test_sqlite_file_read_only_at_start(tmp_path: Path, immutable: Any) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with contextlib.closing(sqlite3.connect(data / "s.db")) as con:
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("CREATE TABLE t (a)")
    immutable(data)
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(full_chain("echo:", sqlite_store(data / "s.db")))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(cfg),
        "--port",
        str(free_port()),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    text = err.decode()
    assert proc.returncode == 2, text
    assert f"store.path: cannot open {data / 's.db'}" in text
    assert_no_traceback(text)


async def test_client_leaving_an_echo_stream_logs_no_error(
    make_proxy: ProxyFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_proxy(full_chain("echo:?delay=0.02", sqlite_store(tmp_path / "s.db")))
    before = await baseline(client)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            words = " ".join(f"w{i}" for i in range(40))
            resp = await client.post(
                "/v1/chat/completions", json=body(words, stream=True), headers=AUTH
            )
            await resp.content.readuntil(b"\n\n")
            await resp.content.readuntil(b"\n\n")
            assert resp.connection is not None and resp.connection.transport is not None
            resp.connection.transport.abort()
            resp.close()
        await assert_nothing_left(client, before)
        await asyncio.sleep(0.1)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
