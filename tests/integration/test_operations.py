"""Operations: metrics, reload, graceful shutdown, workers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import STATE, build_app
from proxy.loader import load
from proxy.server import reload
from tests.fixtures import BASIC, DONE, Backend, ProxyFactory, chat_body, chunk, metric

ROOT = Path(__file__).resolve().parents[2]


async def test_metrics_after_traffic(make_proxy: ProxyFactory, backend: Backend) -> None:
    client = await make_proxy(BASIC, backend)
    before = await (await client.get("/metrics")).text()
    for _ in range(3):
        assert (await client.post("/v1/chat/completions", json=chat_body())).status == 200
    backend.chat(lambda r: _stream(r))
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    await resp.read()
    resp = await client.post("/v1/chat/completions", data=b"{bad")
    assert resp.status == 400
    scrape = await client.get("/metrics")
    assert scrape.status == 200
    assert scrape.headers["Content-Type"].startswith("text/plain")
    after = await scrape.text()
    ok = metric(after, "chat_proxy_requests_total", route="chat", status="200", model="test-model")
    assert (
        ok
        - metric(
            before, "chat_proxy_requests_total", route="chat", status="200", model="test-model"
        )
        == 4
    )
    bad = metric(after, "chat_proxy_requests_total", route="chat", status="400")
    assert bad - metric(before, "chat_proxy_requests_total", route="chat", status="400") == 1
    assert metric(after, "chat_proxy_time_to_first_byte_seconds_count", route="chat") >= 4
    assert metric(after, "chat_proxy_request_duration_seconds_count", route="chat") >= 5
    assert metric(after, "chat_proxy_streams_in_flight") == 0


async def _stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(chunk("hi") + DONE)
    await resp.write_eof()
    return resp


async def test_upstream_errors_are_counted(make_proxy: ProxyFactory, backend: Backend) -> None:
    async def fail(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "down"}, status=503)

    backend.chat(fail)
    client = await make_proxy(BASIC, backend)
    before = metric(
        await (await client.get("/metrics")).text(),
        "chat_proxy_upstream_errors_total",
        upstream="main",
        kind="http_503",
    )
    assert (await client.post("/v1/chat/completions", json=chat_body())).status == 503
    after = metric(
        await (await client.get("/metrics")).text(),
        "chat_proxy_upstream_errors_total",
        upstream="main",
        kind="http_503",
    )
    assert after - before == 1


async def test_reload_during_a_live_stream(
    aiohttp_client: Any, backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk("one"))
        await asyncio.wait_for(release.wait(), 5)
        await resp.write(chunk("two") + DONE)
        await resp.write_eof()
        return resp

    backend.chat(slow)
    path = tmp_path / "proxy.yaml"

    def write(team: str) -> None:
        path.write_text(
            f"upstreams:\n  - name: main\n    url: {backend.url}\n"
            f"middleware:\n  - type: tests.plugins.audit:audit\n    team: {team}\n"
        )

    write("blue")
    app = build_app(load(path, env={}))
    client = await aiohttp_client(app)
    live = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert live.headers["X-Audited-By"] == "blue"
    assert await live.content.readuntil(b"\n\n") == chunk("one")

    write("red")
    assert await reload(app, str(path)) is True
    fresh = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert fresh.headers["X-Audited-By"] == "red"  # new requests get the new chain

    release.set()
    assert await live.read() == chunk("two") + DONE  # the old stream finishes intact
    await fresh.read()

    path.write_text("upstreams: [\n")  # a bad file keeps the running chain
    with caplog.at_level(logging.ERROR):
        assert await reload(app, str(path)) is False
    assert any("reload failed" in r.getMessage() for r in caplog.records)
    again = await client.post("/v1/chat/completions", json=chat_body())
    assert again.headers["X-Audited-By"] == "red"


async def test_draining_answers_503(make_proxy: ProxyFactory, backend: Backend) -> None:
    client = await make_proxy(BASIC, backend)
    client.server.app[STATE].draining = True
    resp = await client.get("/readyz")
    assert resp.status == 503 and (await resp.json())["status"] == "draining"
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "shutting_down"
    assert (await client.get("/healthz")).status == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start(config: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            *extra,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError(proc.communicate()[1].decode())


def _logs(stderr: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]


async def test_sigterm_during_a_live_stream_finishes_it(tmp_path: Path) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        'server: {drain_seconds: 10}\nupstreams:\n  - name: echo\n    url: "echo:?delay=0.1"\n'
    )
    port = _free_port()
    proc = _start(cfg, port)
    words = " ".join(f"w{i}" for i in range(12))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"stream": True, "messages": [{"role": "user", "content": words}]},
            ) as resp:
                first = await resp.content.readuntil(b"\n\n")
                assert first.startswith(b"data: ")
                proc.send_signal(signal.SIGTERM)
                rest = await resp.content.read()
        assert rest.endswith(b"data: [DONE]\n\n")
        text = "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            for line in (first + rest).split(b"\n\n")
            if line.startswith(b"data: {")
        )
        assert text == "You said: " + words
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as http:
                await http.get(f"http://127.0.0.1:{port}/healthz")  # no longer accepting
    finally:
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err.decode()
    msgs = [x["msg"] for x in _logs(err)]
    assert "draining" in msgs and msgs[-1] == "stopped"


async def test_two_workers_serve_one_port(tmp_path: Path) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text('upstreams:\n  - name: echo\n    url: "echo:"\n')
    port = _free_port()
    proc = _start(cfg, port, "--workers", "2")
    try:
        await asyncio.sleep(0.5)  # let the second worker bind too
        sent = 40
        for i in range(sent):
            async with aiohttp.ClientSession() as http:  # a new connection each time
                async with http.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": f"n{i}"}]},
                ) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["choices"][0]["message"][
                        "content"
                    ] == f"You said: n{i}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                scrape = await resp.text()
        # whichever worker answers the scrape reports the total of both
        assert metric(scrape, "chat_proxy_requests_total", route="chat", status="200") == sent
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()
    access = [x for x in _logs(err) if x.get("logger") == "chat_proxy.access"]
    assert len(access) == sent
    assert len({x["pid"] for x in access}) == 2


async def test_every_log_line_of_a_request_carries_its_id(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    import io

    from proxy.observability import BufferedHandler, JsonFormatter, RequestIdFilter

    text = BASIC + (
        "middleware:\n  - type: tests.plugins.audit:audit\n    team: t\n    say: looking\n"
        "  - type: tests.plugins.broken:broken\n"
    )
    client = await make_proxy(text, backend)
    out = io.StringIO()
    handler = BufferedHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        resp = await client.post(
            "/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": "trace-me"}
        )
        assert resp.status == 500
    finally:
        handler.flush()
        root.removeHandler(handler)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    [said] = [x for x in lines if x["msg"] == "looking"]
    assert said["request_id"] == "trace-me"  # logged by a middleware that never named it
    error = [x for x in lines if x["msg"] == "unhandled error"]
    assert error and all(x["request_id"] == "trace-me" for x in error)
    assert "ZeroDivisionError" in error[0]["exc"]  # the traceback is in the log, not the body


async def test_metrics_of_the_middlewares(make_proxy: ProxyFactory) -> None:
    text = """
upstreams:
  - name: echo
    url: "echo:"
middleware:
  - type: rate_limit
    requests_per_minute: 3
  - type: session
  - type: tool_keywords
    rules:
      - tool: end_call
        keywords: [goodbye]
"""
    client = await make_proxy(text)
    before = await (await client.get("/metrics")).text()
    tools = [{"type": "function", "function": {"name": "end_call"}}]
    statuses = []
    for i in range(4):
        resp = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": f"goodbye {i}"}], "tools": tools},
        )
        statuses.append(resp.status)
        await resp.read()
    assert statuses == [200, 200, 200, 429]
    after = await (await client.get("/metrics")).text()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("chat_proxy_rate_limit_refusals_total", limit="requests") == 1
    assert delta("chat_proxy_sessions_created_total", source="new") == 3
    assert delta("chat_proxy_tool_calls_rewritten_total", tool="end_call") == 3
    assert delta("chat_proxy_tokens_total", kind="completion") == 3 * 4  # "You said: goodbye N"
    assert delta("chat_proxy_tokens_total", kind="prompt") > 0


async def test_reload_keeps_the_in_process_rate_limit_counters(
    aiohttp_client: Any, backend: Backend, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"

    def write(team: str) -> None:
        path.write_text(
            f"upstreams:\n  - name: main\n    url: {backend.url}\n"
            "middleware:\n"
            f"  - type: tests.plugins.audit:audit\n    team: {team}\n"
            "  - type: rate_limit\n    requests_per_minute: 2\n"
        )

    write("blue")
    app = build_app(load(path, env={}))
    client = await aiohttp_client(app)
    for _ in range(2):
        resp = await client.post("/v1/chat/completions", json=chat_body())
        assert resp.status == 200, await resp.text()
    write("red")
    assert await reload(app, str(path)) is True
    # the new chain runs (the audit header changed) and still counts the two requests
    refused = await client.post("/v1/chat/completions", json=chat_body())
    assert refused.headers["X-Audited-By"] == "red"
    assert refused.status == 429
    assert (await refused.json())["error"]["type"] == "rate_limit_error"
    await asyncio.sleep(0.05)  # the replaced chain retires: its counters live on
    write("green")
    assert await reload(app, str(path)) is True
    again = await client.post("/v1/chat/completions", json=chat_body())
    assert again.status == 429 and again.headers["X-Audited-By"] == "green"
