"""Limits shared through PostgreSQL: two proxy processes on one database enforce one
limit exactly, and share the sessions."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import aiohttp

from tests.fixtures import chat_body
from tests.ratelimit.test_middleware_redis import free_port, wait_until_up

ROOT = Path(__file__).resolve().parents[2]


async def test_two_proxy_processes_enforce_one_limit(tmp_path: Path, pg_dsn: str) -> None:
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(
        f"""
upstreams:
  - name: echo
    url: "echo:"
store: {{backend: postgres, dsn: "{pg_dsn}"}}
middleware:
  - type: tests.ratelimit.fixtures:keyed
  - type: rate_limit
    requests_per_minute: 50
  - type: session
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

            async def one(i: int, key: str, sid: str | None = None) -> int:
                url = f"http://127.0.0.1:{ports[i % 2]}/v1/chat/completions"
                body = chat_body(f"request {i}", model="echo")
                headers = {"X-Test-Key": key}
                if sid is not None:
                    headers["X-Session-Id"] = sid
                async with session.post(url, json=body, headers=headers) as resp:
                    await resp.read()
                    return resp.status

            # the connections (client to proxies, proxies to PostgreSQL) opened under
            # another key, so that the burst takes well under the 1.2 s in which one
            # request comes back
            await asyncio.gather(*[one(i, "warm-up") for i in range(200)])
            statuses = await asyncio.gather(*[one(i, "burst") for i in range(200)])
            # 100 requests reached each replica: limits counted per process would admit 100
            assert Counter(statuses) == {200: 50, 429: 150}

            # one session written through both replicas, read from either
            assert [await one(i, "talk", sid="shared-1") for i in range(6)] == [200] * 6
            for _ in range(100):
                url = f"http://127.0.0.1:{ports[1]}/v1/sessions/shared-1"
                async with session.get(url, headers={"X-Test-Key": "talk"}) as resp:
                    doc = await resp.json() if resp.status == 200 else {}
                if doc.get("turn_count") == 6:
                    break
                await asyncio.sleep(0.05)
            assert doc.get("turn_count") == 6, doc
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
