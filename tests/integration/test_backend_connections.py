"""The proxy's connections to a backend, against a raw socket backend.

The backend here is a few lines of asyncio on 127.0.0.1 that writes exact bytes, so
that it can do what real servers do and aiohttp's test server will not: answer
before it has read the request, or send a header no HTTP library would write. Each
test checks what the proxy's clients get, one after the other, and what the backend
saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from tests.fixtures import ProxyFactory, chat_body, completion

_REQUEST_LINE = re.compile(rb"[A-Z]+ /\S* HTTP/1\.1")


@dataclass
class Request:
    connection: int  # the index of the connection it came on, from 0
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes = b""


@dataclass
class RawBackend:
    """Reads requests (a head, then a Content-Length body) on every connection it
    accepts, and writes `respond(request)` for each.

    When `early(request)` returns bytes for a request's head, the backend writes them
    at once, leaves the body unread, waits `pause` seconds and reads that connection
    on as if the next request came next. Bytes that are no request head get a 400 and
    the connection closed, as a lenient server does."""

    respond: Callable[[Request], bytes]
    early: Callable[[Request], bytes | None] = lambda request: None
    pause: float = 0.0
    accepted: int = 0
    requests: list[Request] = field(default_factory=list)  # those answered whole
    refused: list[int] = field(default_factory=list)  # connections that sent junk
    port: int = 0
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.accepted
        self.accepted += 1
        self._writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    head = b""  # no end of a head in sight
                except asyncio.IncompleteReadError:
                    return
                lines = head.split(b"\r\n")
                if not _REQUEST_LINE.fullmatch(lines[0]):
                    self.refused.append(index)
                    writer.write(
                        b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n"
                        b'Content-Length: 22\r\n\r\n{"error": "not HTTP!"}'
                    )
                    await writer.drain()
                    return
                method, path, _ = lines[0].decode().split(" ")
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.decode("latin-1").partition(":")
                        headers[name.strip().lower()] = value.strip()
                request = Request(index, method, path, headers)
                wire = self.early(request)
                if wire is not None:
                    writer.write(wire)
                    await writer.drain()
                    await asyncio.sleep(self.pause)
                    continue
                request.body = await reader.readexactly(int(headers.get("content-length", 0)))
                self.requests.append(request)
                writer.write(self.respond(request))
                await writer.drain()
        except ConnectionError:
            pass  # the proxy cut the connection
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RawBackend]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for writer in self._writers:
                writer.transport.abort()


def answer(status: bytes, body: bytes, *headers: bytes) -> bytes:
    """An answer with a Content-Length body, kept alive; JSON unless `headers` name
    another Content-Type."""
    if not any(h.lower().startswith(b"content-type:") for h in headers):
        headers = (b"Content-Type: application/json", *headers)
    extra = b"".join(h + b"\r\n" for h in headers)
    return (
        b"HTTP/1.1 " + status + b"\r\n" + extra
        + b"Content-Length: %d\r\nConnection: keep-alive\r\n\r\n" % len(body) + body
    )  # fmt: skip


def config(backend: RawBackend, server: str = "") -> str:
    return f"""
server: {{{server}}}
upstreams:
  - name: main
    url: {backend.url}
    timeouts: {{connect: 2, first_byte: 5, idle: 5}}
"""


def assert_openai_error(doc: Any, code: str) -> None:
    assert isinstance(doc, dict) and set(doc) == {"error"}, doc
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    assert err["code"] == code, err


async def test_an_early_answer_to_a_large_body_is_never_followed_on_its_connection(
    make_proxy: ProxyFactory,
) -> None:
    """The backend answers a 14 MiB body with a 413 after reading its head alone,
    says keep-alive, and reads that connection again a little later. The rest of the
    body never went out: were the connection reused, the next request would follow
    it, and the backend would take body and request for one bad request. Each of the
    next five clients gets the answer to its own request."""

    def early(request: Request) -> bytes | None:
        if int(request.headers.get("content-length", 0)) <= 1024 * 1024:
            return None
        return answer(b"413 Payload Too Large", b'{"error": {"message": "The body is too large."}}')

    def respond(request: Request) -> bytes:
        doc = json.loads(request.body)
        named = {"marker": request.headers.get("x-marker"), "input": doc["input"]}
        return answer(b"200 OK", json.dumps(named).encode())

    backend = RawBackend(respond, early, pause=0.3)
    async with backend.running():
        client = await make_proxy(config(backend, "max_body_bytes: 33554432"))
        big = {"model": "m", "input": "x" * (14 * 1024 * 1024)}
        resp = await client.post("/v1/embeddings", json=big, headers={"X-Marker": "big"})
        assert resp.status == 413
        doc = await resp.json()
        assert doc["error"]["message"] == "The body is too large."

        for i in range(5):
            resp = await client.post(
                "/v1/embeddings",
                json={"model": "m", "input": f"client {i}"},
                headers={"X-Marker": f"client-{i}"},
            )
            assert resp.status == 200, await resp.text()
            assert await resp.json() == {"marker": f"client-{i}", "input": f"client {i}"}

    # the backend got each request whole, none after the big body's first connection
    assert [r.headers["x-marker"] for r in backend.requests] == [f"client-{i}" for i in range(5)]
    assert all(r.connection != 0 for r in backend.requests)


BAD_HEADERS = [
    b"X-Bad: a\x00b",  # NUL
    b"X-Bad: a\rb",  # a bare CR
    # in a header the proxy passes on to its client
    b"Content-Type: application/json\rX-Injected: 1",
    b"Content-Type: application/json\x00",
    b"X-Bad: a\x1b[2Jb",  # an escape sequence
    b"X-B\x7fad: 1",  # DEL in a name
    b"X Bad: 1",  # a name that is no token
]


async def test_a_header_with_a_control_character_gives_502_and_the_proxy_serves_on(
    make_proxy: ProxyFactory,
) -> None:
    def respond(request: Request) -> bytes:
        case = request.headers.get("x-case")
        if case is not None:
            return answer(b"200 OK", json.dumps(completion()).encode(), BAD_HEADERS[int(case)])
        doc = json.loads(request.body)
        text = doc["messages"][0]["content"]
        return answer(b"200 OK", json.dumps(completion(f"You said: {text}")).encode())

    backend = RawBackend(respond)
    async with backend.running():
        client = await make_proxy(config(backend))
        for case in range(len(BAD_HEADERS)):
            resp = await client.post(
                "/v1/chat/completions", json=chat_body(), headers={"X-Case": str(case)}
            )
            assert resp.status == 502, (BAD_HEADERS[case], await resp.text())
            assert resp.headers["Content-Type"].startswith("application/json")
            assert "X-Bad" not in resp.headers
            assert_openai_error(await resp.json(), "upstream_bad_response")

            resp = await client.post("/v1/chat/completions", json=chat_body(f"round {case}"))
            assert resp.status == 200, await resp.text()
            doc = await resp.json()
            assert doc["choices"][0]["message"]["content"] == f"You said: round {case}"
    assert len(backend.requests) >= 2 * len(BAD_HEADERS)
