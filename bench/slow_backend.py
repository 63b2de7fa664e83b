"""A backend that streams slowly: for any POST, a chat-completion SSE stream of
`--events` chunks, one every `--interval` seconds, then `data: [DONE]`.

Raw asyncio (no HTTP framework) so that ten thousand streams at once cost it little:
each stream's events are due at its start plus a multiple of the interval (one loop
timer a stream), so streams opened at different times are not all written in the
same instant. Responses are chunked, connections kept alive. With `--stamp`, each
event's content ends in `@` and the CLOCK_MONOTONIC time at which it is written
(`time.monotonic()`, the same clock in every process of the machine), so that a
client can measure each event's delay through the proxy.

    python bench/slow_backend.py --port 9002 --events 50 --interval 0.1
    python bench/slow_backend.py --port 9002 --events 30 --interval 1 --stamp
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time

HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)
STAMP = "@STAMP"
DONE = b"data: [DONE]\n\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(i: int, last: bool, stamp: bool = False) -> bytes:
    doc = {
        "id": "chatcmpl-slow",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "bench-slow",
        "choices": [
            {
                "index": 0,
                "delta": {} if last else {"content": f" word{i}" + (STAMP if stamp else "")},
                "finish_reason": "stop" if last else None,
            }
        ],
    }
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


class Stream(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.sent = -1  # -1: waiting for a request
        self.t0 = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.sent < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1").lower()
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip() == "content-length":
                    length = int(value.strip())
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            self.start()

    def start(self) -> None:
        assert self.transport is not None
        loop = self.server.loop
        self.t0 = loop.time()
        self.transport.write(HEAD + chunk(self.server.event(0)))
        self.sent = 1
        self.timer = loop.call_at(self.t0 + self.server.interval, self.tick)

    def tick(self) -> None:
        self.timer = None
        if self.transport is None:
            return
        server = self.server
        if self.sent < server.n:
            self.transport.write(chunk(server.event(self.sent)))
            self.sent += 1
            self.timer = server.loop.call_at(self.t0 + self.sent * server.interval, self.tick)
            return
        self.transport.write(chunk(DONE) + b"0\r\n\r\n")
        self.sent = -1
        if self.buf:
            self.data_received(b"")


class Server:
    def __init__(self, n: int, interval: float, stamp: bool) -> None:
        self.loop = asyncio.get_running_loop()
        self.n = n
        self.interval = interval
        self.stamp = stamp
        self.events = [event(i, i == n - 1) for i in range(n)]
        # with --stamp: each content event in two parts, the time written between them
        self.parts = [event(i, i == n - 1, stamp).split(STAMP.encode()) for i in range(n)]

    def event(self, i: int) -> bytes:
        parts = self.parts[i]
        if not self.stamp or len(parts) == 1:
            return self.events[i]
        return parts[0] + b"@%.6f" % time.monotonic() + parts[1]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument(
        "--stamp", action="store_true", help="end each content with @ and the time it is written"
    )
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # a connection a stream
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = Server(args.events, args.interval, args.stamp)
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: Stream(server), args.host, args.port, backlog=4096)
    async with srv:
        await srv.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
