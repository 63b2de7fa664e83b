"""Where a stream's memory goes: one chat-proxy process holding `--n` slow streams,
the Python allocations made since just before the streams opened and still alive once
they are all open (tracemalloc), per stream and per place that allocated, beside the
growth of the process's RSS.

    .venv/bin/python bench/stream_memory.py --config empty --n 2000
    .venv/bin/python bench/stream_memory.py --config full --n 2000 --top 30

Starts bench/slow_backend.py (an event every 2 s, for 90 s) and the proxy
(bench/configs/<config>.yaml, one process; a first SIGUSR1 starts tracemalloc, the
next writes a snapshot), opens the streams with
bench/slow_streams.py, waits until the proxy counts them all in flight, then prints
the bytes a stream costs by group (aiohttp's connection, request and response, the
backend connection, the relay, the middlewares, ...: each allocation charged to the
innermost frame of a group's module on its stack) and by allocating line. Writes
bench/results/stream-memory-<config>.json. Every process it starts is stopped at the
end; the run is bounded (about two minutes at most).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PY = REPO / ".venv" / "bin" / "python"
KEY = "sk-bench-0123456789abcdef"

# run inside the proxy process: the first SIGUSR1 starts tracemalloc, the next ones
# write a snapshot (of what was allocated since, and is alive)
WRAPPER = """
import os, signal, sys, tracemalloc
def dump(signum, frame):
    n = int(open(os.environ["SNAP_SEQ"]).read() or 0)
    if not tracemalloc.is_tracing():
        tracemalloc.start(int(os.environ["SNAP_FRAMES"]))
    else:
        tracemalloc.take_snapshot().dump(os.environ["SNAP_PREFIX"] + str(n))
    open(os.environ["SNAP_SEQ"], "w").write(str(n + 1))
signal.signal(signal.SIGUSR1, dump)
from proxy.cli import main
sys.exit(main(sys.argv[1:]))
"""

# groups, by the module an allocation's stack passes through (innermost first wins)
GROUPS = (
    ("proxy/backend/http1/", "backend connection (proxy/backend/http1)"),
    ("proxy/relay.py", "relay (proxy/relay.py)"),
    ("proxy/transform.py", "stream transformer (proxy/transform.py)"),
    ("proxy/inbound.py", "client connection (proxy/inbound.py)"),
    ("proxy/sessions/", "session middleware"),
    ("proxy/ratelimit/", "rate_limit"),
    ("proxy/middleware/", "middlewares"),
    ("proxy/", "the proxy's core (entry, chain, attempt, exchange)"),
    ("aiohttp/web_protocol.py", "aiohttp server connection (RequestHandler)"),
    ("aiohttp/web_request.py", "aiohttp request (web.Request)"),
    ("aiohttp/web_response.py", "aiohttp response (StreamResponse)"),
    ("aiohttp/", "aiohttp, other"),
    ("multidict/", "multidict"),
    ("yarl/", "yarl"),
    ("asyncio/", "asyncio"),
    ("uvloop/", "uvloop"),
)


def group_of(frames: list[str]) -> str:
    for needle, name in GROUPS:
        for f in frames:
            if needle in f:
                return name
    return "other"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port}") from None
            time.sleep(0.1)


def tail(path: Path, n: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])[-3000:]
    except OSError:
        return "(no log)"


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def signal_proxy(pid: int, run: Path) -> Path:
    """SIGUSR1 to the proxy; the path prefix of what it wrote."""
    seq = run / "seq"
    n = int(seq.read_text() or 0)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 60
    while int(seq.read_text() or 0) == n:
        if time.monotonic() > deadline:
            raise RuntimeError("the proxy wrote nothing")
        time.sleep(0.2)
    return run / f"snap{n}"


def in_flight(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("chat_proxy_streams_in_flight"):
                    return float(line.split()[-1])
    except OSError:
        pass
    return -1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="empty", help="bench/configs/<config>.yaml")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--ramp", type=float, default=4.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--frames", type=int, default=6, help="tracemalloc frames")
    parser.add_argument("--output", default="")
    args = parser.parse_args()
    run = Path(tempfile.mkdtemp(prefix="chat-proxy-bench-mem-"))
    (run / "seq").write_text("0")
    procs: list[subprocess.Popen[bytes]] = []
    loads: list[subprocess.Popen[bytes]] = []
    headers = {"X-API-Key": KEY} if args.config.startswith("full") else {}
    events = 45  # long enough for the snapshots: the streams last 90 s
    try:
        slow, port = free_port(), free_port()
        backend = [str(PY), str(BENCH / "slow_backend.py"), "--port", str(slow)]
        backend += ["--events", str(events), "--interval", "2"]
        procs.append(subprocess.Popen(backend, cwd=REPO))
        wait_port(slow)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")},
            "BENCH_PORT": str(port),
            "BENCH_BACKEND": f"http://127.0.0.1:{slow}",  # not used by the streams
            "BENCH_SLOW": f"http://127.0.0.1:{slow}",
            "BENCH_SLOW_CONNECTIONS": str(args.n + 100),
            "BENCH_RUN": str(run),
            "BENCH_KEY": KEY,
            "BENCH_LOG_LEVEL": "warning",
            "SNAP_PREFIX": str(run / "snap"),
            "SNAP_SEQ": str(run / "seq"),
            "SNAP_FRAMES": str(args.frames),
        }
        config = BENCH / "configs" / f"{args.config}.yaml"
        log = (run / "proxy.log").open("wb")
        proxy = subprocess.Popen(
            [str(PY), "-c", WRAPPER, "serve", "--config", str(config)],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(proxy)
        try:
            wait_port(port, 120)
        except RuntimeError:
            raise RuntimeError((run / "proxy.log").read_text()[-2000:]) from None
        body = run / "body.json"
        body.write_text(
            json.dumps(
                {
                    "model": "bench-slow",
                    "stream": True,
                    "messages": [{"role": "user", "content": "Say hello, slowly."}],
                }
            )
        )

        def streams(n: int, ramp: float) -> subprocess.Popen[bytes]:
            argv = [str(PY), str(BENCH / "slow_streams.py"), "--url"]
            argv += [f"http://127.0.0.1:{port}/v1/chat/completions", "--body", str(body)]
            argv += ["--n", str(n), "--procs", "1", "--ramp", str(ramp)]
            argv += ["--expect", str(events + 1), "--timeout", str(events + 30)]
            for k, v in headers.items():
                argv += ["--header", f"{k}: {v}"]
            # a session of its own: the load generator and its worker process stop together
            return subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                cwd=REPO,
                start_new_session=True,
            )

        # warm-up: a few streams through every path once, then gone
        warm = streams(20, 0.5)
        time.sleep(3)
        os.killpg(warm.pid, signal.SIGKILL)
        warm.wait()
        time.sleep(2)
        rss0 = rss_kb(proxy.pid)
        signal_proxy(proxy.pid, run)  # tracing from here
        loads.append(streams(args.n, args.ramp))
        deadline = time.monotonic() + args.ramp + 60
        while (now := in_flight(port)) < args.n and time.monotonic() < deadline:
            print(f"  {now:.0f} streams in flight", file=sys.stderr, flush=True)
            time.sleep(1)
        time.sleep(3)  # a few events each
        n = int(in_flight(port))
        rss1 = rss_kb(proxy.pid)
        snap = signal_proxy(proxy.pid, run)
        after = tracemalloc.Snapshot.load(str(snap))
        if n <= 0:
            raise RuntimeError("no stream open; the proxy's log:\n" + tail(run / "proxy.log"))
        stats = after.statistics("traceback")  # alive, allocated since tracing began
        total = sum(s.size for s in stats)
        by_group: dict[str, int] = {}
        by_line: dict[str, int] = {}
        for s in stats:
            frames = [f"{f.filename}:{f.lineno}" for f in reversed(s.traceback)]  # newest first
            frames = [f.split("site-packages/")[-1].split("/work/main/")[-1] for f in frames]
            group = group_of(frames)
            by_group[group] = by_group.get(group, 0) + s.size
            by_line[frames[0]] = by_line.get(frames[0], 0) + s.size
        report: dict[str, Any] = {
            "config": args.config,
            "streams": n,
            "streams_open": n,
            "rss_per_stream_bytes": (rss1 - rss0) * 1024 / n,
            "traced_per_stream_bytes": total / n,
            "by_group": {k: v / n for k, v in sorted(by_group.items(), key=lambda kv: -kv[1])},
            "by_line": {
                k: v / n for k, v in sorted(by_line.items(), key=lambda kv: -kv[1])[: args.top]
            },
        }
        print(
            f"{args.config}: {n} streams open; a stream: RSS +{report['rss_per_stream_bytes']:,.0f} "
            f"bytes (tracemalloc's records included), Python allocations alive "
            f"+{report['traced_per_stream_bytes']:,.0f}"
        )
        print("by group (bytes a stream):")
        for k, v in report["by_group"].items():
            print(f"  {v:9,.0f}  {k}")
        print("by allocating line:")
        for k, v in report["by_line"].items():
            print(f"  {v:9,.0f}  {k}")
        out = Path(args.output or BENCH / "results" / f"stream-memory-{args.config}.json")
        out.write_text(json.dumps(report, indent=1) + "\n")
        return 0
    finally:
        for load in loads:  # each in a session of its own, with its worker process
            with contextlib.suppress(ProcessLookupError):
                os.killpg(load.pid, signal.SIGKILL)
            load.wait()
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        if os.environ.get("STREAM_MEMORY_KEEP"):
            print(f"kept {run}")
        else:
            subprocess.run(["rm", "-rf", str(run)], check=False)


if __name__ == "__main__":
    sys.exit(main())
