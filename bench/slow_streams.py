"""Many slow streams at once, from several processes, each event's delay measured.

    python bench/slow_streams.py --url http://127.0.0.1:8080/v1/chat/completions \\
        --body body.json --n 10000 --procs 4 --ramp 10 --expect 31

Opens `--n` streams over `--ramp` seconds from `--procs` processes (one process holds
at most its open-file limit of connections, and a single event loop reading 10,000
sockets would measure itself rather than the proxy), reads each to its end, and
prints one JSON object: how many completed with every event and `[DONE]`, the most
streams open at the same time, and the delay of every event, from the time the
backend wrote it (bench/slow_backend.py --stamp: the content ends in `@` and
`time.monotonic()`, the machine's CLOCK_MONOTONIC, as this process reads it too) to
the time this process read it off its socket (ms percentiles over every event of
every stream).

Bounded: each process gives up `--timeout` seconds after the last stream was due to
start, and counts what has not ended by then as failed.

The client is a small HTTP/1.1 protocol of its own (chunked or Content-Length bodies),
one connection a stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import subprocess
import sys
import time
from array import array
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

STAMP = re.compile(rb"@(\d+\.\d+)")


def percentiles(values: list[float] | array[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    out: dict[str, float] = {}
    for p in (1, 10, 25, 50, 75, 90, 95, 99, 99.9):
        k = min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))
        out[f"{p:g}"] = s[k]
    out["max"] = s[-1]
    return out


class Stream(asyncio.Protocol):
    """One connection, one streamed request, its response decoded as it comes."""

    def __init__(self, client: Child) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.done = client.loop.create_future()
        self.status = 0
        self.events = 0
        self.finished = False  # [DONE] seen
        self.head = b""
        self.raw = b""  # framing bytes not yet decoded
        self.body = b""  # body bytes after the last event boundary
        self.state = "head"  # head | size | data | crlf | trailer | length | close | end
        self.left = 0
        self.opened = 0.0
        self.closed = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.write(self.client.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.done.done():
            if self.state == "close":
                self.end()
            else:
                self.done.set_exception(ConnectionError(f"connection lost ({self.state})"))

    def end(self) -> None:
        self.state = "end"
        self.closed = time.monotonic()
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def events_in(self, data: bytes, now: float) -> None:
        buf = self.body + data if self.body else data
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            event = buf[start:end]
            start = end + 2
            if not event.strip() or event.startswith(b":"):
                continue  # a comment (keep-alive)
            self.events += 1
            m = STAMP.search(event)
            if m is not None:
                self.client.delays.append((now - float(m[1])) * 1000)
            elif b"[DONE]" in event:
                self.finished = True
        self.body = buf[start:]

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.raw + data if self.raw else data
        self.raw = b""
        while buf:
            st = self.state
            if st == "head":
                self.head += buf
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, buf = self.head[:end].decode("latin-1"), self.head[end + 4 :]
                lines = head.split("\r\n")
                self.status = int(lines[0].split(" ", 2)[1])
                self.opened = now
                length = None
                chunked = False
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value.strip())
                    elif name == "transfer-encoding" and "chunked" in value.lower():
                        chunked = True
                if chunked:
                    self.state = "size"
                elif length is not None:
                    self.state, self.left = "length", length
                    if not length:
                        self.end()
                        return
                else:
                    self.state = "close"
            elif st == "size":
                end = buf.find(b"\r\n")
                if end < 0:
                    self.raw = buf
                    return
                size = int(buf[:end].split(b";")[0], 16)
                buf = buf[end + 2 :]
                self.state, self.left = ("trailer", 0) if size == 0 else ("data", size)
            elif st in ("data", "length"):
                take = buf[: self.left]
                buf = buf[len(take) :]
                self.left -= len(take)
                self.events_in(take, now)
                if not self.left:
                    if st == "length":
                        self.end()
                        return
                    self.state, self.left = "crlf", 2
            elif st == "crlf":
                n = min(self.left, len(buf))
                buf = buf[n:]
                self.left -= n
                if not self.left:
                    self.state = "size"
            elif st == "trailer":
                end = buf.find(b"\r\n")
                if end < 0:
                    self.raw = buf
                    return
                trailer, buf = buf[:end], buf[end + 2 :]
                if not trailer:
                    self.end()
                    return
            elif st == "close":
                self.events_in(buf, now)
                return
            else:
                return


class Child:
    def __init__(self, args: argparse.Namespace) -> None:
        self.loop = asyncio.get_running_loop()
        u = urlsplit(args.url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        body = Path(args.body).read_bytes()
        head = [
            f"POST {u.path or '/'} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Content-Type: application/json",
            "Accept: text/event-stream",
            f"Content-Length: {len(body)}",
            *args.header,
        ]
        self.request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        self.delays: array[float] = array("d")
        self.args = args

    async def one(self, at: float) -> tuple[str | None, Stream | None]:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        try:
            _, s = await self.loop.create_connection(lambda: Stream(self), self.host, self.port)
        except OSError as exc:
            return f"connect: {exc!r}", None
        try:
            await s.done
        except ConnectionError as exc:
            return f"status {s.status}, {s.events} events: {exc}", s
        if s.status != 200:
            return f"status {s.status}", s
        if not s.finished or (self.args.expect and s.events != self.args.expect):
            return f"status 200, {s.events} events, [DONE] {s.finished}", s
        return None, s

    async def run(self) -> dict[str, Any]:
        a = self.args
        mine = range(a.index, a.n, a.procs)
        starts = [a.start + a.ramp * i / a.n for i in mine]
        tasks = [asyncio.create_task(self.one(at)) for at in starts]
        deadline = a.start + a.ramp + a.timeout
        done, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()))
        for t in pending:
            t.cancel()
        errors: dict[str, int] = {}
        spans: list[tuple[float, float]] = []
        durations: list[float] = []
        ok = 0
        for t in done:
            why, s = t.result()
            if s is not None and s.opened:
                spans.append((s.opened, s.closed or time.monotonic()))
            if why is None and s is not None:
                ok += 1
                durations.append(s.closed - s.opened)
            else:
                errors[why or "?"] = errors.get(why or "?", 0) + 1
        if pending:
            errors["did not end in time"] = len(pending)
        return {
            "streams": len(starts),
            "completed": ok,
            "errors": errors,
            "spans": spans,
            "durations": durations,
            "delays": self.delays.tolist(),
        }


def child(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run  # type: ignore[assignment]

    async def main() -> dict[str, Any]:
        return await Child(args).run()

    json.dump(run(main()), sys.stdout)


def most_open(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    best = now = 0
    for _, d in edges:
        now += d
        best = max(best, now)
    return best


def parent(args: argparse.Namespace) -> None:
    start = time.monotonic() + 1.0 + args.procs * 0.2  # every process ready by then
    base = [sys.executable, str(Path(__file__).resolve()), "--url", args.url, "--body", args.body]
    for h in args.header:
        base += ["--header", h]
    common = [
        "--n",
        str(args.n),
        "--procs",
        str(args.procs),
        "--ramp",
        str(args.ramp),
        "--expect",
        str(args.expect),
        "--timeout",
        str(args.timeout),
        "--start",
        repr(start),
    ]
    procs = [
        subprocess.Popen([*base, *common, "--index", str(i)], stdout=subprocess.PIPE)
        for i in range(args.procs)
    ]
    parts: list[dict[str, Any]] = []
    failed: list[str] = []
    for i, p in enumerate(procs):
        out, _ = p.communicate(timeout=args.ramp + args.timeout + 60)
        if p.returncode != 0:
            failed.append(f"process {i} exited {p.returncode}")
            continue
        parts.append(json.loads(out))
    errors: dict[str, int] = {}
    for part in parts:
        for k, v in part["errors"].items():
            errors[k] = errors.get(k, 0) + v
    for f in failed:
        errors[f] = errors.get(f, 0) + 1
    delays = [d for part in parts for d in part["delays"]]
    spans = [(s[0], s[1]) for part in parts for s in part["spans"]]
    result = {
        "streams": args.n,
        "completed": sum(p["completed"] for p in parts),
        "failed": args.n - sum(p["completed"] for p in parts),
        "processes": args.procs,
        "most_open": most_open(spans),
        "events_measured": len(delays),
        "delay_ms": percentiles(delays),
        "stream_seconds": percentiles([d for p in parts for d in p["durations"]]),
        "seconds": time.monotonic() - start,
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:8]),
    }
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="file holding the JSON request body")
    parser.add_argument("--header", action="append", default=[], help="Name: value")
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--ramp", type=float, default=10.0, help="seconds to open --n streams over")
    parser.add_argument("--expect", type=int, default=0, help="events every stream must carry")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds after the ramp to give up"
    )
    parser.add_argument("--index", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.index >= 0:
        child(args)
    else:
        if args.n / args.procs > resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 100:
            raise SystemExit(f"--procs {args.procs}: more streams a process than its fd limit")
        parent(args)


if __name__ == "__main__":
    main()
