"""Soak test: mixed traffic against a real chat-proxy process for N minutes, with the
proxy's memory sampled as it goes.

    .venv/bin/python bench/soak.py --minutes 10

Starts `python -m proxy serve` with the whole chain (auth, rate_limit, validate,
session on SQLite, model_override, tool_keywords) in front of a small backend of its
own (which streams, answers JSON, and sometimes fails: a 500, a stream cut short) and
of `echo:`, everything on 127.0.0.1. Workers send a mix of streams, streams the client
leaves mid-way, plain completions, conversations continued turn after turn (matched,
or pinned with X-Session-Id), bad requests, unknown keys, a key whose limit answers
429, Sessions API and /v1/models calls. Every few seconds it reads the proxy's RSS
(/proc/PID/status VmRSS), its open descriptors and threads. At the end it checks that
no stream is left in flight and that the proxy stops cleanly, then prints RSS over
time and the growth after warm-up (the first minute): the target is under 10%. Last,
it asks the idle proxy to malloc_trim(0) (through a sitecustomize hook; --no-trim to
leave the process alone) and reports RSS again: what glibc hands back was free memory
malloc kept, not memory in use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
MAX_MINUTES = 240.0
KEYS = {
    "soak": "sk-soak-main-4Jv8Qm2Xr6Tz0Lp3",
    "limited": "sk-soak-limited-8Hn1Wc5Ye9Ub2Ko7",
    "chat-only": "sk-soak-chat-3Fd7Gs1Pa4Zx6Nm0",
}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "says"]
WORDS += ["goodbye", "to", "the", "cat"]

CONFIG = """
server:
  host: 127.0.0.1
  log_level: info
  keepalive_seconds: 5
upstreams:
  - name: scripted
    url: {backend}
    models: ["soak-*"]
    timeouts: {{connect: 2, first_byte: 10, idle: 10}}
  - name: echo
    url: "echo:?delay=0.01"
    models: ["*"]
store:
  backend: sqlite
  path: {db}
middleware:
  - type: auth
    keys:
      - id: soak
        key: {soak}
        scopes: [chat, models, sessions:read, sessions:write]
      - id: limited
        key: {limited}
        limits: {{requests_per_minute: 20}}
      - id: chat-only
        key: {chat_only}
        scopes: [chat]
  - type: rate_limit
    requests_per_minute: 1000000
    tokens_per_minute: 1000000000
    max_concurrent: 1000
  - type: validate
  - type: session
  - type: model_override
    default: soak-stream
    aliases: {{soak-alias: soak-stream}}
  - type: tool_keywords
    rules:
      - tool: end_call
        keywords: [goodbye]
"""


# -- the backend --


def backend_app() -> web.Application:
    """Streams and completions of a few random words; `soak-fail` fails in one of two
    ways (a 500, or a stream cut after some events)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        model = str(doc.get("model"))
        words = random.choices(WORDS, k=random.randint(3, 24))
        if model == "soak-fail":
            if random.random() < 0.5:
                return web.json_response({"error": {"message": "the model crashed"}}, status=500)
            words = words[:4]
        usage = {
            "prompt_tokens": 12,
            "completion_tokens": len(words),
            "total_tokens": 12 + len(words),
        }
        base = {"id": "chatcmpl-soak", "created": int(time.time()), "model": model}
        if not doc.get("stream"):
            return web.json_response(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": " ".join(words)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        def event(choices: list[Any], extra: dict[str, Any] | None = None) -> bytes:
            body = {**base, "object": "chat.completion.chunk", "choices": choices, **(extra or {})}
            return b"data: " + json.dumps(body).encode() + b"\n\n"

        try:
            for i, word in enumerate(words):
                delta = {"content": word if i == 0 else " " + word}
                await resp.write(event([{"index": 0, "delta": delta, "finish_reason": None}]))
                await asyncio.sleep(0.005)
            if model == "soak-fail":
                assert request.transport is not None
                request.transport.abort()  # cut mid-stream
                return resp
            await resp.write(event([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
            opts = doc.get("stream_options")
            if isinstance(opts, dict) and opts.get("include_usage"):
                await resp.write(event([], {"usage": usage}))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass  # the proxy let go: its client left
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": m, "object": "model"} for m in ("soak-stream", "soak-fail")],
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app


# -- the traffic --


@dataclass
class Stats:
    statuses: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    failures: list[str] = field(default_factory=list)

    def count(self, kind: str, status: int | str) -> None:
        self.requests += 1
        self.statuses[f"{kind}:{status}"] += 1

    def unexpected(self, what: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(what)


def _auth(name: str = "soak") -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def _text() -> str:
    return " ".join(random.choices(WORDS, k=random.randint(2, 12)))


def _stream_text(raw: bytes) -> str:
    out = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: {"):
            doc = json.loads(block[6:])
            for choice in doc.get("choices") or ():
                out.append((choice.get("delta") or {}).get("content") or "")
    return "".join(out)


class Worker:
    def __init__(
        self, http: aiohttp.ClientSession, stats: Stats, n: int, only: frozenset[str] = frozenset()
    ) -> None:
        self.only = only
        self.http = http
        self.stats = stats
        self.n = n
        self.history: list[dict[str, Any]] = []
        self.pinned = f"soak-{n}-{random.randrange(10**6)}"
        self.sessions: list[str] = []

    async def post(
        self, kind: str, body: Any, headers: dict[str, str], expect: tuple[int, ...]
    ) -> tuple[int, bytes, str]:
        async with self.http.post("/v1/chat/completions", json=body, headers=headers) as resp:
            raw = await resp.read()
            sid = resp.headers.get("X-Session-Id", "")
        self.stats.count(kind, resp.status)
        if resp.status not in expect:
            self.stats.unexpected(f"{kind}: {resp.status} {raw[:200]!r}")
        return resp.status, raw, sid

    async def stream(self) -> None:
        body = {
            "model": "soak-stream",
            "stream": True,
            "messages": [{"role": "user", "content": _text()}],
        }
        if random.random() < 0.3:
            body["tools"] = [{"type": "function", "function": {"name": "end_call"}}]
        status, raw, sid = await self.post("stream", body, _auth(), (200,))
        if status == 200 and not raw.endswith(b"data: [DONE]\n\n"):
            self.stats.unexpected(f"stream did not end: {raw[-200:]!r}")
        if sid:
            self.sessions.append(sid)

    async def leave_mid_stream(self) -> None:
        model = random.choice(["soak-stream", "echo"])
        words = " ".join(random.choices(WORDS, k=30))
        body = {"model": model, "stream": True, "messages": [{"role": "user", "content": words}]}
        async with self.http.post("/v1/chat/completions", json=body, headers=_auth()) as resp:
            self.stats.count("left", resp.status)
            if resp.status == 200:
                await resp.content.readuntil(b"\n\n")
                await resp.content.readuntil(b"\n\n")
            resp.close()  # the connection goes with it

    async def completion(self) -> None:
        model = random.choice(["soak-stream", "echo", "soak-alias", None])
        body: dict[str, Any] = {"messages": [{"role": "user", "content": _text()}]}
        if model:
            body["model"] = model
        await self.post("completion", body, _auth(), (200,))

    async def conversation(self) -> None:
        """One more turn of this worker's conversation (a new one now and then)."""
        if not self.history or len(self.history) > 12 or random.random() < 0.1:
            self.history = []
        self.history.append({"role": "user", "content": _text()})
        stream = random.random() < 0.5
        headers = _auth()
        pinned = random.random() < 0.3
        if pinned:
            headers["X-Session-Id"] = self.pinned
        body = {"model": "soak-stream", "stream": stream, "messages": self.history}
        status, raw, _ = await self.post("conversation", body, headers, (200,))
        if status != 200:
            self.history = []
            return
        reply = _stream_text(raw) if stream else json.loads(raw)["choices"][0]["message"]["content"]
        self.history.append({"role": "assistant", "content": reply})

    async def bad_request(self) -> None:
        choice = random.randrange(4)
        if choice == 0:
            async with self.http.post(
                "/v1/chat/completions", data=b"{oops", headers=_auth()
            ) as resp:
                await resp.read()
                self.stats.count("bad", resp.status)
                if resp.status != 400:
                    self.stats.unexpected(f"bad JSON: {resp.status}")
            return
        bodies: list[dict[str, Any]] = [
            {"model": "soak-stream", "messages": []},
            {
                "model": "soak-stream",
                "messages": [{"role": "user", "content": "x"}],
                "temperature": 9,
            },
            {"model": "soak-stream", "messages": [{"role": "wizard", "content": "x"}]},
        ]
        body = bodies[choice - 1]
        await self.post("bad", body, _auth(), (400,))

    async def unknown_key(self) -> None:
        body = {"model": "echo", "messages": [{"role": "user", "content": "x"}]}
        await self.post(
            "unknown-key", body, {"X-API-Key": f"sk-nope-{random.randrange(10**9)}"}, (401,)
        )

    async def limited(self) -> None:
        body = {"model": "echo", "messages": [{"role": "user", "content": "x"}]}
        await self.post("limited", body, _auth("limited"), (200, 429))

    async def backend_failure(self) -> None:
        stream = random.random() < 0.5
        body = {
            "model": "soak-fail",
            "stream": stream,
            "messages": [{"role": "user", "content": "x"}],
        }
        await self.post("backend-fail", body, _auth(), (200, 502))

    async def sessions_api(self) -> None:
        what = random.randrange(4)
        expect: tuple[int, ...]
        if what == 0 or not self.sessions:
            path, headers, expect = "/v1/sessions?limit=20", _auth(), (200,)
        elif what == 1:
            path, headers, expect = f"/v1/sessions/{self.sessions[-1]}", _auth(), (200, 404)
        elif what == 2:
            path, headers, expect = "/v1/sessions", _auth("chat-only"), (403,)
        else:
            sid = self.sessions.pop(0)
            async with self.http.delete(f"/v1/sessions/{sid}", headers=_auth()) as resp:
                await resp.read()
                self.stats.count("sessions", resp.status)
                if resp.status not in (200, 404):
                    self.stats.unexpected(f"delete: {resp.status}")
            return
        async with self.http.get(path, headers=headers) as resp:
            await resp.read()
            self.stats.count("sessions", resp.status)
            if resp.status not in expect:
                self.stats.unexpected(f"{path}: {resp.status}")
        if len(self.sessions) > 50:
            del self.sessions[:25]

    async def misc(self) -> None:
        path, headers = random.choice(
            [("/v1/models", _auth()), ("/healthz", {}), ("/readyz", {}), ("/metrics", {})]
        )
        async with self.http.get(path, headers=headers) as resp:
            await resp.read()
            self.stats.count("misc", resp.status)
            if resp.status != 200:
                self.stats.unexpected(f"{path}: {resp.status}")

    async def run(self, until: float) -> None:
        mix = [
            (self.stream, 25),
            (self.leave_mid_stream, 8),
            (self.completion, 15),
            (self.conversation, 20),
            (self.bad_request, 6),
            (self.unknown_key, 5),
            (self.limited, 5),
            (self.backend_failure, 6),
            (self.sessions_api, 6),
            (self.misc, 4),
        ]
        if self.only:
            mix = [(a, w) for a, w in mix if a.__name__ in self.only]
        actions = [a for a, _ in mix]
        weights = [w for _, w in mix]
        while time.monotonic() < until:
            action = random.choices(actions, weights)[0]
            try:
                await action()
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                self.stats.count(action.__name__, type(exc).__name__)
                self.stats.unexpected(f"{action.__name__}: {exc!r}")
                await asyncio.sleep(0.05)


# -- sampling --


@dataclass
class Sample:
    t: float
    rss_kib: int
    fds: int
    threads: int
    requests: int


def _status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def sample(pid: int, t: float, requests: int) -> Sample:
    st = _status(pid)
    return Sample(
        t=t,
        rss_kib=int(st["VmRSS"].split()[0]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(st["Threads"]),
        requests=requests,
    )


# loaded by the proxy process (through PYTHONPATH) unless --no-trim: SIGUSR1 makes
# glibc hand the free memory it holds back to the system, so that the report can tell
# memory in use from memory malloc keeps for later
TRIM_HOOK = """
import ctypes, signal
try:
    _trim = ctypes.CDLL("libc.so.6").malloc_trim
    signal.signal(signal.SIGUSR1, lambda signum, frame: _trim(0))
except (OSError, AttributeError):
    pass
"""


def start_proxy(
    config: Path, port: int, log_path: Path, hook_dir: Path | None
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if hook_dir is not None:
        (hook_dir / "sitecustomize.py").write_text(TRIM_HOOK)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook_dir), env.get("PYTHONPATH")]))
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
        )


def wait_ready(proc: subprocess.Popen[bytes], base: str, log_path: Path) -> None:
    for _ in range(400):
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(base + "/healthz", timeout=1):
                return
        if proc.poll() is not None:
            raise SystemExit(f"the proxy exited: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)
    raise SystemExit("the proxy did not start in 20 s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rpartition(" ")[2])
    return total


async def soak(args: argparse.Namespace) -> int:
    minutes = min(float(args.minutes), MAX_MINUTES)
    duration = minutes * 60
    warmup = min(60.0, duration / 3)
    work = Path(tempfile.mkdtemp(prefix="chat-proxy-soak-"))
    runner = web.AppRunner(backend_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    backend_port = runner.addresses[0][1]
    config = work / "soak.yaml"
    config.write_text(
        CONFIG.format(
            backend=f"http://127.0.0.1:{backend_port}/v1",
            db=json.dumps(str(work / "sessions.db")),
            soak=KEYS["soak"],
            limited=KEYS["limited"],
            chat_only=KEYS["chat-only"],
        )
    )
    port = free_port()
    log_path = work / "proxy.log"
    hook_dir = work / "hook" if args.trim else None
    if hook_dir is not None:
        hook_dir.mkdir()
    proc = start_proxy(config, port, log_path, hook_dir)
    base = f"http://127.0.0.1:{port}"
    stats = Stats()
    only = frozenset(a.strip() for a in (args.only or "").split(",") if a.strip())
    samples: list[Sample] = []
    code = 1
    try:
        await asyncio.to_thread(wait_ready, proc, base, log_path)
        print(
            f"soak: {minutes:g} min, {args.concurrency} workers, proxy pid {proc.pid} on :{port}, "
            f"sampling every {args.sample:g} s; work dir {work}",
            flush=True,
        )
        start = time.monotonic()
        until = start + duration
        timeout = aiohttp.ClientTimeout(total=60)
        connector = aiohttp.TCPConnector(limit=args.concurrency * 2)
        async with aiohttp.ClientSession(base, timeout=timeout, connector=connector) as http:
            workers = [
                asyncio.create_task(Worker(http, stats, n, only).run(until))
                for n in range(args.concurrency)
            ]
            next_print = start
            while time.monotonic() < until:
                now = time.monotonic() - start
                samples.append(sample(proc.pid, now, stats.requests))
                if time.monotonic() >= next_print:
                    s = samples[-1]
                    print(
                        f"  {now / 60:5.1f} min  RSS {s.rss_kib / 1024:6.1f} MiB  fds {s.fds:4d}  "
                        f"threads {s.threads:3d}  requests {s.requests}",
                        flush=True,
                    )
                    next_print += 60
                await asyncio.sleep(min(args.sample, max(0.0, until - time.monotonic())))
            await asyncio.gather(*workers)
            samples.append(sample(proc.pid, time.monotonic() - start, stats.requests))
            await asyncio.sleep(1.0)
            async with http.get("/metrics") as resp:
                in_flight = metric(await resp.text(), "chat_proxy_streams_in_flight")
            async with http.get("/healthz") as resp:
                healthy = resp.status == 200
        idle = sample(proc.pid, time.monotonic() - start, stats.requests)
        trimmed: Sample | None = None
        if args.trim:
            proc.send_signal(signal.SIGUSR1)
            await asyncio.sleep(1.0)
            trimmed = sample(proc.pid, time.monotonic() - start, stats.requests)
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(30)
        code = report(
            args,
            minutes,
            warmup,
            samples,
            idle,
            trimmed,
            stats,
            in_flight,
            healthy,
            exit_code,
            log_path,
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        await runner.cleanup()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return code


def _at(samples: list[Sample], t: float) -> Sample:
    return min(samples, key=lambda s: abs(s.t - t))


def report(
    args: argparse.Namespace,
    minutes: float,
    warmup: float,
    samples: list[Sample],
    idle: Sample,
    trimmed: Sample | None,
    stats: Stats,
    in_flight: float,
    healthy: bool,
    exit_code: int,
    log_path: Path,
) -> int:
    mib = 1024.0
    warm = _at(samples, warmup)
    end = samples[-1]
    # the median of the last 10% of samples, against spikes of a moment
    tail = [s.rss_kib for s in samples if s.t >= end.t * 0.9] or [end.rss_kib]
    settled = statistics.median(tail)
    growth = (settled - warm.rss_kib) / warm.rss_kib * 100
    peak = max(s.rss_kib for s in samples)
    errors = [
        line
        for line in log_path.read_text(errors="replace").splitlines()
        if '"level": "error"' in line
    ]
    step = 60.0 if minutes >= 3 else max(args.sample, minutes * 60 / 6)
    rows: list[Sample] = []
    t = 0.0
    while t <= end.t + 1e-6:
        rows.append(_at(samples, t))
        t += step
    if rows[-1] is not end:
        rows.append(end)
    lines = [
        f"Soak: {minutes:g} min of mixed traffic, {args.concurrency} workers, "
        f"{stats.requests} requests ({stats.requests / max(end.t, 1e-9):.0f}/s)",
        "",
        "| time (min) | RSS (MiB) | open fds | threads | requests |",
        "|---:|---:|---:|---:|---:|",
    ]
    for s in rows:
        lines.append(
            f"| {s.t / 60:.1f} | {s.rss_kib / mib:.1f} | {s.fds} | {s.threads} | {s.requests} |"
        )
    ok = (
        growth < 10
        and in_flight == 0
        and healthy
        and exit_code == 0
        and not stats.failures
        and not errors
    )
    lines += [
        "",
        f"- RSS after warm-up ({warm.t / 60:.1f} min): {warm.rss_kib / mib:.1f} MiB; at the end "
        f"(median of the last 10%): {settled / mib:.1f} MiB; growth **{growth:+.1f}%** "
        f"(target < 10%); peak {peak / mib:.1f} MiB",
        f"- idle after the traffic: RSS {idle.rss_kib / mib:.1f} MiB, {idle.fds} fds; "
        f"streams in flight {in_flight:g}; /healthz {'ok' if healthy else 'FAILED'}; "
        f"SIGTERM exit code {exit_code}",
    ]
    if trimmed is not None:
        lines.append(
            f"- idle, after malloc_trim(0) in the proxy (free memory glibc kept, handed back): "
            f"RSS {trimmed.rss_kib / mib:.1f} MiB, "
            f"{(trimmed.rss_kib - warm.rss_kib) / warm.rss_kib * 100:+.1f}% from the warm-up"
        )
    lines += [
        f"- answers: {', '.join(f'{k} x{v}' for k, v in sorted(stats.statuses.items()))}",
        f"- unexpected answers: {len(stats.failures)}; error lines in the proxy's log: {len(errors)}",
        f"- result: {'PASS' if ok else 'FAIL'}",
    ]
    for failure in stats.failures[:10]:
        lines.append(f"  - {failure}")
    text = "\n".join(lines)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(
            json.dumps(
                {
                    "minutes": minutes,
                    "concurrency": args.concurrency,
                    "requests": stats.requests,
                    "growth_percent": round(growth, 2),
                    "idle_rss_kib": idle.rss_kib,
                    "trimmed_rss_kib": trimmed.rss_kib if trimmed is not None else None,
                    "rss_kib": [
                        [round(s.t, 1), s.rss_kib, s.fds, s.threads, s.requests] for s in samples
                    ],
                    "statuses": dict(stats.statuses),
                    "failures": stats.failures,
                    "passed": ok,
                },
                indent=1,
            )
        )
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--minutes",
        type=float,
        default=10.0,
        help=f"how long (default 10, at most {MAX_MINUTES:g})",
    )
    parser.add_argument("--concurrency", type=int, default=8, help="client workers (default 8)")
    parser.add_argument(
        "--sample", type=float, default=5.0, help="seconds between RSS samples (default 5)"
    )
    parser.add_argument(
        "--out", help="also write the report (markdown) here, and its data next to it (.json)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (config, log, database)"
    )
    parser.add_argument(
        "--no-trim",
        dest="trim",
        action="store_false",
        help="do not ask the idle proxy to malloc_trim at the end (the last report line)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed of the traffic mix")
    parser.add_argument(
        "--only",
        help="comma-separated kinds of traffic to send, to find what a growth comes from: "
        "stream, leave_mid_stream, completion, conversation, bad_request, unknown_key, "
        "limited, backend_failure, sessions_api, misc",
    )
    args = parser.parse_args()
    if args.minutes <= 0 or args.concurrency < 1 or args.sample <= 0:
        parser.error("--minutes, --concurrency and --sample must be positive")
    random.seed(args.seed)
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
