"""A backend that streams slowly: for any POST, a chat-completion SSE stream of
`--events` chunks, one every `--interval` seconds, then `data: [DONE]`.

Raw asyncio (no HTTP framework) so that a thousand streams at once cost it little: one
timer ticks every interval and writes the next event to every open stream. Responses
are chunked, connections kept alive.

    python bench/slow_backend.py --port 9002 --events 50 --interval 0.1
"""

from __future__ import annotations

import argparse
import asyncio
import json

HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(i: int, last: bool) -> bytes:
    doc = {
        "id": "chatcmpl-slow",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "bench-slow",
        "choices": [
            {
                "index": 0,
                "delta": {} if last else {"content": f" word{i}"},
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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.active.discard(self)
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
        self.sent = 0
        self.transport.write(HEAD + chunk(self.server.events[0]))
        self.sent = 1
        self.server.active.add(self)

    def tick(self) -> None:
        if self.transport is None:
            return
        events = self.server.events
        if self.sent < len(events):
            self.transport.write(chunk(events[self.sent]))
            self.sent += 1
            return
        self.transport.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        self.server.active.discard(self)
        self.sent = -1
        if self.buf:
            self.data_received(b"")


class Server:
    def __init__(self, n: int) -> None:
        self.events = [event(i, i == n - 1) for i in range(n)]
        self.active: set[Stream] = set()

    async def ticker(self, interval: float) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            for stream in list(self.active):
                stream.tick()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.1)
    args = parser.parse_args()
    server = Server(args.events)
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: Stream(server), args.host, args.port, backlog=4096)
    async with srv:
        await server.ticker(args.interval)


if __name__ == "__main__":
    asyncio.run(main())
