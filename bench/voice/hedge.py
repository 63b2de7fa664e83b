"""Hedging against a slow replica: the time to the first content token with
`hedge.after_ms` off and on, and what it costs in backend requests.

Five stand-in replicas stream a chat answer; one of them (one replica in five) takes
`--slow-ms` before its first token, the others `--fast-ms`. The proxy (a real
`chat-proxy serve` process) balances conversations by affinity over the five, as in
front of a voice agent, and the client measures when the first content delta of each
streamed turn arrives. Bounded: a fixed number of conversations and turns.

    .venv/bin/python bench/voice/hedge.py            # writes bench/results/hedge.{json,md}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def chunk(content: str, index: int, last: bool = False) -> bytes:
    doc = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": content}
                if index == 0
                else {"content": content},
                "finish_reason": "stop" if last else None,
            }
        ],
    }
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


class Replica:
    def __init__(self, first_token: float) -> None:
        self.first_token = first_token
        self.received = 0
        self.cancelled = 0

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.received += 1
        try:
            await asyncio.sleep(self.first_token)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(5):
            await resp.write(chunk(f"word{i} ", i, last=i == 4))
            await asyncio.sleep(0.01)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def start_replicas(
    n: int, slow: int, fast_s: float, slow_s: float
) -> tuple[list[Replica], list[web.AppRunner], list[int]]:
    replicas, runners, ports = [], [], []
    for i in range(n):
        r = Replica(slow_s if i == slow else fast_s)
        app = web.Application(handler_args={"handler_cancellation": True})
        app.router.add_post("/v1/chat/completions", r.chat)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        replicas.append(r)
        runners.append(runner)
        ports.append(port)
    return replicas, runners, ports


def start_proxy(
    ports: list[int], after_ms: int, workdir: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    replicas = ", ".join(f"http://127.0.0.1:{p}/v1" for p in ports)
    config = workdir / f"hedge-{after_ms}.yaml"
    config.write_text(
        f"""
server: {{host: 127.0.0.1, port: {port}, log_level: warning}}
upstreams:
  - name: voice
    replicas: [{replicas}]
    balance: affinity
    hedge: {{after_ms: {after_ms}}}
    timeouts: {{connect: 2, first_byte: 10, idle: 10}}
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(workdir / f"proxy-{after_ms}.log").open("wb"),
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the proxy did not start")


async def turn(
    session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]]
) -> tuple[float, int]:
    """The time to the first content token of one streamed turn, and its attempts."""
    started = time.perf_counter()
    body = {"model": "bench", "stream": True, "messages": messages}
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}: {await resp.text()}")
        attempts = int(resp.headers.get("x-upstream-attempts", "1"))
        first: float | None = None
        async for line in resp.content:
            if first is None and line.startswith(b"data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    first = time.perf_counter() - started
        assert first is not None
        return first, attempts


async def run(after_ms: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    replicas, runners, ports = await start_replicas(5, 4, args.fast_ms / 1000, args.slow_ms / 1000)
    proc, port = start_proxy(ports, after_ms, workdir)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    ttft: list[float] = []
    hedged = 0
    try:
        conversations = list(range(args.conversations))
        queue: asyncio.Queue[int] = asyncio.Queue()
        for c in conversations:
            queue.put_nowait(c)

        async def worker(session: aiohttp.ClientSession) -> None:
            nonlocal hedged
            while not queue.empty():
                c = queue.get_nowait()
                history = [
                    {"role": "system", "content": "You are a phone agent."},
                    {"role": "user", "content": f"caller {c} says hello"},
                ]
                for t in range(args.turns):
                    first, attempts = await turn(session, url, history)
                    ttft.append(first)
                    hedged += attempts > 1
                    history += [
                        {"role": "assistant", "content": "word0 word1"},
                        {"role": "user", "content": f"turn {t}"},
                    ]

        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.wait_for(
                asyncio.gather(*(worker(session) for _ in range(args.concurrency))), 600
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        for runner in runners:
            await runner.cleanup()
    ttft.sort()
    sent = len(ttft)
    received = sum(r.received for r in replicas)
    return {
        "hedge_after_ms": after_ms,
        "turns": sent,
        "ttft_p50_ms": round(1000 * statistics.median(ttft), 1),
        "ttft_p90_ms": round(1000 * ttft[int(0.90 * (sent - 1))], 1),
        "ttft_p99_ms": round(1000 * ttft[int(0.99 * (sent - 1))], 1),
        "ttft_mean_ms": round(1000 * statistics.fmean(ttft), 1),
        "hedged_turns": hedged,
        "backend_requests": received,
        "extra_backend_requests_pct": round(100 * (received - sent) / sent, 1),
        "cancelled_at_backend": sum(r.cancelled for r in replicas),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def markdown(report: dict[str, Any]) -> str:
    off, on = report["runs"]
    p = report["params"]
    lines = [
        f"# Hedging against a slow replica ({report['date']})",
        "",
        f"Machine: {report['machine']}; commit {report['commit']}.",
        f"Five stand-in replicas, one with its first token after {p['slow_ms']} ms, the others "
        f"after {p['fast_ms']} ms; {p['conversations']} conversations of {p['turns']} streamed "
        f"turns, {p['concurrency']} at a time, balanced by affinity.",
        "",
        "| hedge.after_ms | turns | TTFT p50 | p90 | p99 | mean | hedged turns | backend requests | extra |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (off, on):
        lines.append(
            f"| {r['hedge_after_ms'] or 'off'} | {r['turns']} | {r['ttft_p50_ms']} ms | "
            f"{r['ttft_p90_ms']} ms | {r['ttft_p99_ms']} ms | {r['ttft_mean_ms']} ms | "
            f"{r['hedged_turns']} | {r['backend_requests']} | {r['extra_backend_requests_pct']}% |"
        )
    lines += [
        "",
        f"- p99 with hedging is {report['p99_ratio']:.2f} of the p99 without (target: at most 0.5): "
        f"{'met' if report['p99_ratio'] <= 0.5 else 'missed'}.",
        f"- Extra backend requests: {on['extra_backend_requests_pct']}% (target: at most 25%): "
        f"{'met' if on['extra_backend_requests_pct'] <= 25 else 'missed'}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=60)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--fast-ms", type=int, default=60)
    parser.add_argument("--slow-ms", type=int, default=1500)
    parser.add_argument("--after-ms", type=int, default=250)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [asyncio.run(run(after, args, Path(tmp))) for after in (0, args.after_ms)]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {cpu_model()}",
        "commit": commit,
        "params": vars(args),
        "runs": runs,
        "p99_ratio": runs[1]["ttft_p99_ms"] / runs[0]["ttft_p99_ms"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hedge.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (RESULTS / "hedge.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
