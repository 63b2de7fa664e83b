"""Instructions per request under callgrind: a measure of the proxy's cost that other
work on the machine does not move.

Requests per second and CPU time per request move by 10-20% from run to run on a
shared machine; the number of instructions the proxy executes per request does not
(repeatable to about 1%), so it tells whether a small change to the hot path helps.
Each config runs in a proxy process under `valgrind --tool=callgrind` in front of a
canned backend (a raw asyncio server in its own process, answering the benchmark's
completion); after a warm-up the counters are zeroed, N non-streamed chat requests
are sent one at a time over 4 keep-alive connections, and the counters are dumped.

    .venv/bin/python bench/instructions.py                    # empty and full, ~1 min
    .venv/bin/python bench/instructions.py -n 2000 empty      # one config, more requests

Needs valgrind (`apt-get install valgrind`). Figures are instructions (thousands)
per request at concurrency 1, all threads, and the share of them outside the event
loop's thread (the session writer's SQLite thread).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BENCH, KEY, PROJECT_PY, completion_doc, request_body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _serve(port: int) -> None:
    body = json.dumps(completion_doc()).encode()
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                writer.write(answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(client, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def wait_healthy(port: int, proc: subprocess.Popen[bytes], limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the proxy exited at start-up")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the proxy did not answer /healthz")


def send(port: int, n: int, headers: dict[str, str]) -> None:
    body = request_body("bench-json")
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(4)]
    for i in range(n):
        c = conns[i % 4]
        c.request("POST", "/v1/chat/completions", body, headers)
        resp = c.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"the proxy answered {resp.status}")
    for c in conns:
        c.close()


def totals(dump: Path) -> int:
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def thread_totals(dumps: list[Path]) -> tuple[int, int]:
    """(all threads, threads other than the first) from per-thread dump files."""
    counts = sorted((p.name, totals(p)) for p in dumps)
    return sum(c for _, c in counts), sum(c for _, c in counts[1:])


def measure(config: str, n: int, warmup: int, backend_port: int, work: Path) -> tuple[int, int]:
    port = free_port()
    name = Path(config).stem
    out = work / f"cg.{name}"
    env = {
        **os.environ,
        "BENCH_PORT": str(port),
        "BENCH_BACKEND": f"http://127.0.0.1:{backend_port}",
        "BENCH_SLOW": f"http://127.0.0.1:{backend_port}",
        "BENCH_RUN": str(work),
        "BENCH_KEY": KEY,
        "BENCH_LOG_LEVEL": "info",
    }
    argv = [
        "valgrind",
        "--tool=callgrind",
        "--separate-threads=yes",
        f"--callgrind-out-file={out}.%p",
        str(PROJECT_PY),
        "-m",
        "proxy",
        "serve",
        "--config",
        config if config.endswith(".yaml") else str(BENCH / "configs" / f"{config}.yaml"),
    ]
    log = (work / f"{name}.log").open("wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
    headers = {"Content-Type": "application/json", "X-API-Key": KEY}
    try:
        wait_healthy(port, proc, 120)
        send(port, warmup, headers)
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        send(port, n, headers)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    dumps = sorted(work.glob(f"cg.{name}.{proc.pid}.1-*")) or sorted(
        work.glob(f"cg.{name}.{proc.pid}.1")
    )
    if not dumps:
        raise RuntimeError(f"no callgrind dump for {config} in {work}")
    return thread_totals(dumps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "configs",
        nargs="*",
        default=["empty", "full"],
        help="names in bench/configs, or paths of YAML files using the same BENCH_* variables",
    )
    parser.add_argument("-n", type=int, default=1000, help="measured requests")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--serve-backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_backend:
        asyncio.run(_serve(args.serve_backend))
        return 0
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: apt-get install valgrind", file=sys.stderr)
            return 2
    backend_port = free_port()
    backend = subprocess.Popen(
        [sys.executable, __file__, "--serve-backend", str(backend_port)],
        stdout=subprocess.DEVNULL,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="chat-proxy-instructions-") as tmp:
            print(f"{'config':<16}{'k instr/request':>16}{'other threads':>15}")
            for config in args.configs:
                total, others = measure(config, args.n, args.warmup, backend_port, Path(tmp))
                share = f"{others / total:.0%}" if total else "-"
                name = Path(config).stem
                print(f"{name:<16}{total / args.n / 1000:>16,.0f}{share:>15}", flush=True)
    finally:
        backend.terminate()
        backend.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
