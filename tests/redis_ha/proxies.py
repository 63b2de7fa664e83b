"""Proxy processes for the tests against Redis deployments: `chat-proxy serve` as a
child process on a free port, in front of the built-in echo upstream, with the
stand-in auth of the rate-limit tests (X-Test-Key: NAME calls as key NAME)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from tests.redis_ha.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def config(store: dict[str, Any], middleware: str) -> str:
    return (
        'upstreams:\n  - name: echo\n    url: "echo:"\n'
        f"store: {json.dumps(store)}\n"
        f"middleware:\n{middleware}"
    )


class Proxy:
    def __init__(self, port: int, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.port = port
        self.proc = proc
        self.log = log

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def _wait_up(proxy: Proxy, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proxy.proc.returncode is not None:
                raise AssertionError(f"the proxy exited: {proxy.log.read_text()}")
            try:
                async with session.get(proxy.base + "/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"the proxy did not start: {proxy.log.read_text()}")


@asynccontextmanager
async def proxies(tmp: Path, texts: list[str]) -> AsyncIterator[list[Proxy]]:
    """One proxy process per configuration text; stopped with SIGTERM afterwards."""
    started: list[Proxy] = []
    try:
        for i, text in enumerate(texts):
            cfg = tmp / f"proxy{i}.yaml"
            cfg.write_text(text)
            log = tmp / f"proxy{i}.log"
            port = free_port()
            with log.open("wb") as out:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "proxy",
                    "serve",
                    "--config",
                    str(cfg),
                    "--port",
                    str(port),
                    cwd=ROOT,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            started.append(Proxy(port, proc, log))
        for proxy in started:
            await _wait_up(proxy)
        yield started
    finally:
        for proxy in started:
            if proxy.proc.returncode is None:
                proxy.proc.send_signal(signal.SIGTERM)
        for proxy in started:
            try:
                await asyncio.wait_for(proxy.proc.wait(), 15)
            except TimeoutError:
                proxy.proc.kill()
                await proxy.proc.wait()
