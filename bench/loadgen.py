"""The stream load generator of the benchmark (wrk measures the non-streamed requests).

Modes, each printing one JSON object on stdout:
  ttfb     streamed requests one after the other on `--concurrency` keep-alive
           connections for `--duration` seconds: time to the first byte of the body and
           to the end of each stream (ms)
  events   `--concurrency` clients reading long streams back to back for `--duration`
           seconds: SSE events received per second
  streams  `--n` streams opened at once (over `--ramp` seconds), each read to its end:
           how many completed with every event and `[DONE]`

The client is a small HTTP/1.1 protocol of its own (Content-Length and chunked bodies,
keep-alive), so that it costs as little as possible beside the proxy it measures.
Events are counted as blank-line boundaries (`\\n\\n`) in the decoded body.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any
from urllib.parse import urlsplit


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    out: dict[str, float] = {}
    for p in [*range(1, 100), 99.9]:
        k = min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))
        out[f"{p:g}"] = s[k]
    return out


class Response:
    """What one request got: status, events, [DONE], time of the first body byte."""

    def __init__(self) -> None:
        self.status = 0
        self.events = 0
        self.done = False
        self.first = 0.0
        self.error: str | None = None


class Conn(asyncio.Protocol):
    """One keep-alive connection that sends a request and decodes its response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.waiter: asyncio.Future[Response] | None = None
        self.resp = Response()
        self.buf = b""
        self.state = "idle"  # idle | head | length | chunk-size | chunk-data | chunk-crlf | trailer
        self.left = 0
        self.tail = b""  # the last bytes of body seen, for boundaries split across reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            if self.state == "close":  # a body delimited by the end of the connection
                self.waiter.set_result(self.resp)
            else:
                self.waiter.set_exception(ConnectionError(f"connection lost in state {self.state}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, request: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None and self.state == "idle"
        self.resp = Response()
        self.buf = b""
        self.tail = b""
        self.state = "head"
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def body(self, data: bytes) -> None:
        if not data:
            return
        r = self.resp
        if not r.first:
            r.first = time.perf_counter()
        joined = self.tail + data
        r.events += joined.count(b"\n\n", max(0, len(self.tail) - 1))
        if not r.done and b"[DONE]" in joined:
            r.done = True
        self.tail = joined[-8:]

    def finish(self) -> None:
        self.state = "idle"
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.resp)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        self.buf = b""
        while buf:
            st = self.state
            if st == "length":
                take = buf[: self.left]
                self.body(take)
                self.left -= len(take)
                buf = buf[len(take) :]
                if self.left == 0:
                    self.finish()
            elif st == "chunk-data":
                take = buf[: self.left]
                self.body(take)
                self.left -= len(take)
                buf = buf[len(take) :]
                if self.left == 0:
                    self.state = "chunk-crlf"
                    self.left = 2
            elif st == "chunk-crlf":
                n = min(self.left, len(buf))
                buf = buf[n:]
                self.left -= n
                if self.left == 0:
                    self.state = "chunk-size"
            elif st == "chunk-size":
                end = buf.find(b"\r\n")
                if end < 0:
                    self.buf = buf
                    return
                size = int(buf[:end].split(b";")[0], 16)
                buf = buf[end + 2 :]
                if size == 0:
                    self.state = "trailer"
                else:
                    self.state = "chunk-data"
                    self.left = size
            elif st == "trailer":
                end = buf.find(b"\r\n")
                if end < 0:
                    self.buf = buf
                    return
                line, buf = buf[:end], buf[end + 2 :]
                if not line:
                    self.finish()
            elif st == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    self.buf = buf
                    return
                head, buf = buf[:end].decode("latin-1"), buf[end + 4 :]
                lines = head.split("\r\n")
                self.resp.status = int(lines[0].split(" ", 2)[1])
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
                    self.state = "chunk-size"
                elif length is not None:
                    self.state = "length"
                    self.left = length
                    if length == 0:
                        self.finish()
                else:
                    self.state = "close"
            elif st == "close":
                self.body(buf)
                return
            else:  # idle: bytes nobody asked for
                return


class Client:
    def __init__(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        u = urlsplit(url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        head = [
            f"POST {path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            f"Content-Length: {len(body)}",
            "Accept: text/event-stream, application/json",
        ]
        head += [f"{k}: {v}" for k, v in headers.items()]
        self.request = ("\r\n".join(head) + "\r\n\r\n").encode() + body

    async def connect(self) -> Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(Conn, self.host, self.port)
        return conn

    async def one(self, conn: Conn | None, timeout: float) -> tuple[Conn, Response, float]:
        """(the connection to reuse, the response, t0); reconnects when needed."""
        if conn is None or conn.transport is None or conn.state != "idle":
            if conn is not None and conn.transport is not None:
                conn.transport.close()
            conn = await self.connect()
        t0 = time.perf_counter()
        resp = await asyncio.wait_for(conn.send(self.request), timeout)
        if conn.state == "close" and conn.transport is not None:
            conn.transport.close()
        return conn, resp, t0


async def ttfb(args: argparse.Namespace, client: Client) -> dict[str, Any]:
    firsts: list[float] = []
    totals: list[float] = []
    errors: list[str] = []
    bad = 0

    async def worker(deadline: float, warmup: int) -> None:
        nonlocal bad
        conn: Conn | None = None
        n = 0
        while time.perf_counter() < deadline and len(errors) <= 20:
            try:
                conn, r, t0 = await client.one(conn, args.timeout)
            except Exception as exc:
                errors.append(repr(exc))
                conn = None
                continue
            t1 = time.perf_counter()
            n += 1
            if n <= warmup:
                continue
            if r.status != 200:
                errors.append(f"status {r.status}")
                continue
            if not r.done or (args.expect and r.events != args.expect):
                bad += 1
            firsts.append((r.first - t0) * 1000)
            totals.append((t1 - t0) * 1000)
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    deadline = time.perf_counter() + args.duration
    await asyncio.gather(*(worker(deadline, args.warmup) for _ in range(args.concurrency)))
    return {
        "requests": len(firsts),
        "incomplete": bad,
        "errors": errors[:5],
        "error_count": len(errors),
        "ttfb_ms": percentiles(firsts),
        "total_ms": percentiles(totals),
    }


async def events(args: argparse.Namespace, client: Client) -> dict[str, Any]:
    counted = 0
    every = 0  # warm-up included: what the proxy relayed while this ran
    streams = 0
    bad = 0
    errors: list[str] = []
    deadline = 0.0
    warmed = 0
    all_warm = asyncio.Event()
    go = asyncio.Event()

    async def worker() -> None:
        nonlocal counted, every, streams, bad, warmed
        conn: Conn | None = None
        try:
            conn, r, _ = await client.one(conn, args.timeout)  # warm-up, not counted
            every += r.events
        except Exception as exc:
            errors.append(repr(exc))
            conn = None
        warmed += 1
        if warmed == args.concurrency:
            all_warm.set()
        await go.wait()
        while time.perf_counter() < deadline and len(errors) <= 20:
            try:
                conn, r, _ = await client.one(conn, args.timeout)
            except Exception as exc:
                errors.append(repr(exc))
                conn = None
                continue
            if r.status != 200:
                errors.append(f"status {r.status}")
                continue
            counted += r.events
            every += r.events
            streams += 1
            if not r.done or (args.expect and r.events != args.expect):
                bad += 1
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    tasks = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
    await all_warm.wait()
    # counted: every stream that ends before the deadline, and the time until the last ends
    start = time.perf_counter()
    deadline = start + args.duration
    go.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    return {
        "events": counted,
        "all_events": every,
        "streams": streams,
        "incomplete": bad,
        "seconds": elapsed,
        "events_per_second": counted / elapsed if elapsed else 0.0,
        "errors": errors[:5],
        "error_count": len(errors),
    }


async def streams(args: argparse.Namespace, client: Client) -> dict[str, Any]:
    ok = 0
    bad = 0
    errors: list[str] = []
    durations: list[float] = []

    async def one() -> None:
        nonlocal ok, bad
        try:
            conn, r, t0 = await client.one(None, args.timeout)
            if conn.transport is not None:
                conn.transport.close()
        except Exception as exc:
            errors.append(repr(exc))
            bad += 1
            return
        if r.status == 200 and r.done and (not args.expect or r.events == args.expect):
            ok += 1
            durations.append(time.perf_counter() - t0)
        else:
            bad += 1
            errors.append(f"status {r.status}, {r.events} events, done={r.done}")

    start = time.perf_counter()
    tasks = []
    step = max(1, args.n // 50)
    for i in range(args.n):
        tasks.append(asyncio.create_task(one()))
        if args.ramp and i % step == step - 1:
            await asyncio.sleep(args.ramp * step / args.n)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    return {
        "streams": args.n,
        "completed": ok,
        "failed": bad,
        "seconds": elapsed,
        "stream_seconds": percentiles(durations),
        "errors": sorted(set(errors))[:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["ttfb", "events", "streams"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="file holding the JSON request body")
    parser.add_argument("--header", action="append", default=[], help="Name: value")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--ramp", type=float, default=0.0, help="seconds to open --n streams over")
    parser.add_argument("--expect", type=int, default=0, help="events every stream must carry")
    parser.add_argument("--warmup", type=int, default=20, help="ttfb: requests not counted")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    with open(args.body, "rb") as f:
        body = f.read()
    headers = {"Content-Type": "application/json"}
    for h in args.header:
        name, _, value = h.partition(":")
        headers[name.strip()] = value.strip()
    client = Client(args.url, body, headers)
    run = {"ttfb": ttfb, "events": events, "streams": streams}[args.mode]
    result = asyncio.run(run(args, client))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
