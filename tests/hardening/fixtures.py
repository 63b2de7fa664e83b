"""Helpers of the hardening tests: the full chain, a proxy served from a thread of its
own or as a real process, a raw HTTP client, and checks on error bodies."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from proxy.app import build_app
from proxy.errors import OPENAI_TYPES
from proxy.inbound import LimitedRunner
from proxy.loader import load_text
from tests.fixtures import metric  # noqa: F401  (used by the hardening tests)

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

# plain keys of the test configurations; the tests check they never leak
KEYS = {
    "alice": "sk-hard-alice-7Qm2xV9pLr4TzK8wYb3N",
    "bob": "sk-hard-bob-Jd6Fh1sXc0Ve5Rg7Ua2M",
    "carol": "sk-hard-carol-Wn3Pk8Lq2Zt6Yx9Cv4B",
    "dave": "sk-hard-dave-Hs5Gj2Ub7Ko1Ni4Ea8R",
}
ALICE = KEYS["alice"]

TRACEBACK_MARKS = ("Traceback (most recent call last)", 'File "/', 'File "<', '.py", line ')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def full_chain(
    upstream: str,
    store: str,
    *,
    rpm: int = 1_000_000,
    extra_server: str = "",
    timeouts: str = "{connect: 2, first_byte: 5, idle: 5}",
) -> str:
    """The whole chain (auth, rate_limit, validate, session, model_override,
    tool_keywords) in front of one upstream; `store` is the YAML of the store section.
    alice and dave have every scope, bob chat and models, carol every scope and 3
    requests a minute."""
    return f"""
server:
  max_body_bytes: 2097152
  keepalive_seconds: 0
  {extra_server}
upstreams:
  - name: main
    url: "{upstream}"
    timeouts: {timeouts}
store: {store}
middleware:
  - type: auth
    keys:
      - id: alice
        key: {KEYS["alice"]}
        scopes: [chat, models, sessions:read, sessions:write]
      - id: bob
        key: {KEYS["bob"]}
        scopes: [chat, models]
      - id: carol
        key: {KEYS["carol"]}
        scopes: [chat, models, sessions:read, sessions:write]
        limits: {{requests_per_minute: 3}}
      - id: dave
        key: {KEYS["dave"]}
        scopes: [chat, models, sessions:read, sessions:write]
  - type: rate_limit
    requests_per_minute: {rpm}
    tokens_per_minute: 1000000000000
    max_concurrent: 10000
  - type: validate
  - type: session
  - type: model_override
    default: test-model
    aliases: {{alias-model: test-model}}
  - type: tool_keywords
    rules:
      - tool: end_call
        keywords: [goodbye]
"""


def sqlite_store(path: Path) -> str:
    return f"{{backend: sqlite, path: {json.dumps(str(path))}}}"


# -- checks --


def assert_no_traceback(body: bytes | str) -> None:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    for mark in TRACEBACK_MARKS:
        assert mark not in text, text[:2000]


def assert_openai_error(body: bytes, status: int) -> dict[str, Any]:
    """The body is `{"error": {message, type, param, code}}`; returns the inner error."""
    assert_no_traceback(body)
    doc = json.loads(body)
    assert isinstance(doc, dict) and set(doc) == {"error"}, body[:500]
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["type"] in OPENAI_TYPES, err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    if status == 401:
        assert err["type"] == "authentication_error"
    if status == 429:
        assert err["type"] == "rate_limit_error"
    return dict(err)


# -- a raw HTTP/1.1 client --


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def content_type(self) -> str:
        return str(self.headers.get("Content-Type", ""))

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(port: int, data: bytes, timeout: float = 15.0) -> Reply:
    """Send bytes as they are (any header, any body) and read one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        method = data.split(b" ", 1)[0].decode("latin-1")
        resp = http.client.HTTPResponse(sock, method=method)
        resp.begin()
        body = resp.read()
        return Reply(resp.status, resp.headers, body)


def build_request(
    method: str,
    path: str | bytes,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    content_type: bytes | None = b"application/json",
    key: str | None = ALICE,
) -> bytes:
    target = path.encode() if isinstance(path, str) else path
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    if key is not None:
        lines.append(b"Authorization: Bearer " + key.encode())
    if content_type is not None and method in ("POST", "PUT", "PATCH"):
        lines.append(b"Content-Type: " + content_type)
    for name, value in headers or []:
        lines.append(name + b": " + value)
    if method in ("POST", "PUT", "PATCH") or body:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def request(
    port: int,
    method: str,
    path: str | bytes,
    body: bytes | Any = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    **kwargs: Any,
) -> Reply:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return raw_request(port, build_request(method, path, raw, headers, **kwargs))


def chat(text: str = "Hi", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "test-model", "messages": [{"role": "user", "content": text}]}
    body.update(extra)
    return body


def assert_serving(port: int) -> None:
    """A normal chat request succeeds, streamed and not."""
    reply = request(port, "POST", "/v1/chat/completions", chat("still there?"))
    assert reply.status == 200, reply.body[:500]
    assert reply.json()["choices"][0]["message"]["content"] == "You said: still there?"
    reply = request(port, "POST", "/v1/chat/completions", chat("and streaming?", stream=True))
    assert reply.status == 200, reply.body[:500]
    assert reply.body.endswith(b"data: [DONE]\n\n")


# -- a proxy in a thread with its own event loop (for sync, hypothesis-driven tests) --


class ThreadedProxy:
    """The proxy app on a loopback port, served by an event loop in its own thread,
    so that synchronous tests can send it any bytes."""

    def __init__(self, config_text: str) -> None:
        self.config = load_text(config_text, env={})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ThreadedProxy:
        self.thread.start()

        async def up() -> int:
            self.runner = LimitedRunner(
                build_app(self.config), self.config.server.timeouts, access_log=None
            )
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            port: int = self.runner.addresses[0][1]
            return port

        self.port = self.run(up())
        return self

    def stop(self) -> None:
        if self.runner is not None:
            self.run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# -- a real proxy process --


class ProxyProcess:
    """`python -m proxy serve` with its stderr kept in a file."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config = config
        self.port = port
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20) -> ProxyProcess:
        with self.log_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "proxy",
                    "serve",
                    "--config",
                    str(self.config),
                    "--port",
                    str(self.port),
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the proxy exited: {self.log_text()[-3000:]}")
            try:
                reply = request(self.port, "GET", "/healthz", key=None)
                if reply.status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"the proxy did not start: {self.log_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_lines(self) -> list[str]:
        return self.log_text().splitlines()
