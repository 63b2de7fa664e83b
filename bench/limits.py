"""What a client sees when the proxy reaches a limit: its backend pool's
`max_connections`, or its open-file limit (accept() failing with EMFILE).

    .venv/bin/python bench/limits.py

- pool: an upstream with `max_connections: 2` and `timeouts: {first_byte: 3,
  pool: 1}` in front of bench/slow_backend.py; two streams hold both connections, a
  third request waits for a place: its status, error code and message, how long it
  waited, and what /metrics counted.
- descriptors: the proxy started with an open-file limit of 64 (`prlimit`), then
  more client connections opened (and held) than it can take: what the extra
  clients get (an answer, a reset, or nothing within 5 s), what the log says, and
  whether a request is served again once the connections are closed.

Prints one JSON object and writes it to `--output` (bench/results/limits.json);
bench/bench.py runs it as its `limits` scenario. Bounded: about 30 s;
every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PY = REPO / ".venv" / "bin" / "python"

CONFIG = """
server:
  host: 127.0.0.1
  port: {port}
  log_level: info
upstreams:
  - name: slow
    url: http://127.0.0.1:{slow}/v1
    models: ["bench-slow"]
    max_connections: 2
    timeouts: {{first_byte: 3, pool: 1}}
middleware: []
"""


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


def request(port: int, stream: bool, timeout: float = 10.0) -> tuple[int, bytes, float]:
    body = json.dumps(
        {"model": "bench-slow", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(300), time.monotonic() - t0
    except urllib.error.HTTPError as err:
        return err.code, err.read(), time.monotonic() - t0


def metrics(port: int, *names: str) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return [line for line in text.splitlines() if line.startswith(names)]


def hold_stream(port: int) -> socket.socket:
    """A stream request on a raw socket, left open (its backend connection held)."""
    body = json.dumps(
        {"model": "bench-slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )
    s.settimeout(5)
    s.recv(4096)  # the head and the first event: the stream is on
    return s


def pool_full(run: Path, slow: int) -> dict[str, Any]:
    port = free_port()
    (run / "pool.yaml").write_text(CONFIG.format(port=port, slow=slow))
    log = (run / "pool.log").open("wb")
    proxy = subprocess.Popen(
        [str(PY), "-m", "proxy", "serve", "--config", str(run / "pool.yaml")],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port)
        held = [hold_stream(port), hold_stream(port)]
        status, body, waited = request(port, stream=True, timeout=20)
        counted = metrics(port, "chat_proxy_upstream_errors_total", "chat_proxy_requests_total")
        for s in held:
            s.close()
        return {
            "status": status,
            "body": body.decode(errors="replace"),
            "waited_seconds": round(waited, 2),
            "metrics": counted,
        }
    finally:
        proxy.terminate()
        proxy.wait(10)


def descriptors(run: Path, slow: int) -> dict[str, Any]:
    port = free_port()
    (run / "fd.yaml").write_text(CONFIG.format(port=port, slow=slow))
    log_path = run / "fd.log"
    log = log_path.open("wb")
    proxy = subprocess.Popen(
        [
            "prlimit",
            "--nofile=64:64",
            str(PY),
            "-m",
            "proxy",
            "serve",
            "--config",
            str(run / "fd.yaml"),
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    out: dict[str, Any] = {"open_file_limit": 64}
    try:
        wait_port(port)
        status, _, _ = request(port, stream=False)
        out["before"] = status
        fds = len(os.listdir(f"/proc/{proxy.pid}/fd"))
        out["descriptors_at_start"] = fds
        conns: list[socket.socket] = []
        outcomes: dict[str, int] = {}
        for _ in range(80):
            try:
                s = socket.create_connection(("127.0.0.1", port), 2)
            except OSError as exc:
                outcomes[f"connect: {type(exc).__name__}"] = (
                    outcomes.get(f"connect: {type(exc).__name__}", 0) + 1
                )
                continue
            conns.append(s)
        # one request on each: served, refused, reset, or no answer within 5 s
        probe = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        for s in conns:
            s.settimeout(5)
            try:
                s.sendall(probe)
                data = s.recv(100)
                what = data.split(b"\r\n", 1)[0].decode() if data else "closed by the proxy"
            except TimeoutError:
                what = "no answer within 5 s"
            except OSError as exc:
                what = type(exc).__name__
            outcomes[what] = outcomes.get(what, 0) + 1
        out["clients"] = len(conns)
        out["outcomes"] = outcomes
        out["descriptors_at_peak"] = len(os.listdir(f"/proc/{proxy.pid}/fd"))
        for s in conns:
            s.close()
        time.sleep(2)
        try:
            status, _, waited = request(port, stream=False, timeout=10)
            out["after"] = {"status": status, "seconds": round(waited, 2)}
        except OSError as exc:
            out["after"] = repr(exc)
        try:
            out["metrics"] = metrics(
                port, "chat_proxy_requests_total", "chat_proxy_connections_refused_total"
            )
        except OSError as exc:
            out["metrics"] = repr(exc)
    finally:
        proxy.terminate()
        proxy.wait(10)
    lines = log_path.read_text(errors="replace").splitlines()
    # what the proxy logged besides its access lines and start-up: nothing, when a
    # limit passes unseen
    out["log"] = [
        line[:300]
        for line in lines
        if '"chat_proxy.access"' not in line
        and not any(m in line for m in ('"chat-proxy listening"', '"draining"', '"stopped"'))
    ][:5]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(BENCH / "results" / "limits.json"))
    args = parser.parse_args()
    run = Path(tempfile.mkdtemp(prefix="chat-proxy-bench-limits-"))
    slow = free_port()
    backend = subprocess.Popen(
        [
            str(PY),
            str(BENCH / "slow_backend.py"),
            "--port",
            str(slow),
            "--events",
            "20",
            "--interval",
            "1",
        ],
        cwd=REPO,
    )
    try:
        wait_port(slow)
        report = {"pool_full": pool_full(run, slow), "descriptors": descriptors(run, slow)}
    finally:
        backend.terminate()
        backend.wait(10)
        shutil.rmtree(run, ignore_errors=True)
    text = json.dumps(report, indent=1)
    print(text)
    Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
