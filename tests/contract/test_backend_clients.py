"""The contract every backend client keeps, run against each implementation.

(Over 400 lines: the scripted server, the certificates and the contract sit in one
file so that a third client has one file to pass.)

Each test runs once with `proxy.backend.http1.Pool` and once with
`proxy.backend.aiohttp_client.AiohttpClient`, against a scripted server on 127.0.0.1
that reads the request and writes exact bytes. What a caller of either sees must be
the same: status, headers and body, the body as it arrives, connection reuse
(counting the connections the server accepted), the error types, and TLS with a CA
file, without verification and with a client certificate.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.backend import (
    BackendClient,
    BackendResponse,
    BodyTooLarge,
    ConnectTimeout,
    Disconnected,
    ResponseError,
)
from proxy.backend.aiohttp_client import AiohttpClient
from proxy.backend.http1 import Pool
from proxy.config import UpstreamTls
from proxy.routing import tls_context

# -- the scripted server


class Peer:
    """The server's end of one accepted connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def request(self) -> bytes | None:
        """One whole request (head and Content-Length body); None at the client's EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return head + await self.reader.readexactly(length)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


Script = Callable[[Peer], Awaitable[None]]


class Server:
    """Runs `script` for each connection it accepts; counts them."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.accepted = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        try:
            await self.script(Peer(reader, writer))
        except (asyncio.CancelledError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except ssl.SSLError:
            pass  # a TLS client that refused the server's certificate
        finally:
            writer.close()
            self._tasks.discard(task)

    async def stop(self) -> None:
        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def ok(body: bytes = b"ok", *headers: bytes) -> bytes:
    extra = b"".join(h + b"\r\n" for h in headers)
    return b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)


def answering(*responses: bytes) -> Script:
    """Each request, on whichever connection, gets the next of `responses`."""
    queue = list(responses)

    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(queue.pop(0))

    return script


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- the clients

ClientFactory = Callable[..., BackendClient]


@pytest.fixture(params=["http1", "aiohttp"])
async def make_client(request: pytest.FixtureRequest) -> AsyncIterator[ClientFactory]:
    """make_client(port, scheme="http", **options): a client of the kind under test,
    closed after the test."""
    made: list[BackendClient] = []

    def factory(port: int, scheme: str = "http", **options: Any) -> BackendClient:
        cls = Pool if request.param == "http1" else AiohttpClient
        client: BackendClient = cls(scheme, "127.0.0.1", port, **options)
        made.append(client)
        return client

    yield factory
    for client in made:
        await client.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    started: list[Server] = []

    async def start(script: Script, ssl_context: ssl.SSLContext | None = None) -> Server:
        server = Server(script)
        await server.start(ssl_context)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


async def get(client: BackendClient, timeout: float = 2.0) -> BackendResponse:
    return await client.request("GET", "/v1/models", [("X-Test", "1")], None, timeout=timeout)


async def fetch(client: BackendClient) -> tuple[int, bytes]:
    resp = await get(client)
    body = await resp.read(2.0)
    resp.release()
    return resp.status, body


# -- status, headers, body

CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"
)
UNTIL_CLOSE = b"HTTP/1.1 201 Created\r\nX-Kind: until-close\r\n\r\nhello world"


@pytest.mark.parametrize(
    ("wire", "status", "header", "close"),
    [
        (ok(b"hello world", b"X-Kind: length", b"x-kind: twice"), 200, ("x-kind", "length, twice"), False),
        (CHUNKED, 200, ("content-type", "text/event-stream"), False),
        (UNTIL_CLOSE, 201, ("x-kind", "until-close"), True),
    ],
    ids=["content-length", "chunked", "until-close"],
)  # fmt: skip
async def test_status_headers_and_body(
    make_client: ClientFactory,
    serve: Callable[..., Awaitable[Server]],
    wire: bytes,
    status: int,
    header: tuple[str, str],
    close: bool,
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(wire)
        if close:
            peer.writer.close()

    server = await serve(script)
    client = make_client(server.port)
    resp = await client.request("POST", "/v1/chat/completions", [], b'{"a": 1}', timeout=2)
    assert resp.status == status
    name, value = header
    assert resp.headers[name] == value  # lower-case names, repeated fields joined
    assert all(k == k.lower() for k in resp.headers)
    assert await resp.read(2.0) == b"hello world"
    assert resp.complete
    resp.release()


async def test_read_chunk_hands_over_bytes_before_the_body_ends(
    make_client: ClientFactory, serve: Callable[..., Awaitable[Server]]
) -> None:
    go_on = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await go_on.wait()
        await peer.send(b"6\r\nsecond\r\n0\r\n\r\n")

    server = await serve(script)
    client = make_client(server.port)
    resp = await get(client)
    assert await resp.read_chunk(2.0) == b"first"  # while the backend holds the rest
    assert not resp.complete
    go_on.set()
    assert await resp.read_chunk(2.0) == b"second"
    assert await resp.read_chunk(2.0) == b""
    assert resp.complete
    resp.release()


# -- connection reuse


async def test_release_after_the_whole_body_reuses_the_connection(
    make_client: ClientFactory, serve: Callable[..., Awaitable[Server]]
) -> None:
    server = await serve(answering(ok(b"1"), ok(b"2"), ok(b"3")))
    client = make_client(server.port)
    assert await fetch(client) == (200, b"1")
    assert await fetch(client) == (200, b"2")
    assert await fetch(client) == (200, b"3")
    assert server.accepted == 1
    assert client.open_connections == 1


async def test_close_does_not_reuse_the_connection(
    make_client: ClientFactory, serve: Callable[..., Awaitable[Server]]
) -> None:
    # closed while the backend is still sending (a client gone mid-stream): the next
    # request needs a new connection. (Once a whole answer has arrived, aiohttp has
    # already given its connection back: closing then changes nothing there.)
    go_on = asyncio.Event()

    async def first(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        await go_on.wait()
        await peer.send(b"1\r\nb\r\n0\r\n\r\n")
        await answering(ok(b"2"))(peer)

    async def script(peer: Peer) -> None:
        await (first(peer) if server.accepted == 1 else answering(ok(b"2"))(peer))

    server = await serve(script)
    client = make_client(server.port)
    resp = await get(client)
    assert await resp.read_chunk(2.0) == b"a"
    resp.close()
    go_on.set()
    assert await fetch(client) == (200, b"2")
    assert server.accepted == 2


async def test_release_before_the_end_of_the_body_closes_the_connection(
    make_client: ClientFactory, serve: Callable[..., Awaitable[Server]]
) -> None:
    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf.")

    server = await serve(script)
    client = make_client(server.port)
    for _ in range(2):
        resp = await get(client)
        assert await resp.read_chunk(2.0) == b"half."
        resp.release()  # five bytes short: the connection cannot carry another request
    assert server.accepted == 2


async def test_idle_connections_are_dropped_after_idle_seconds(
    make_client: ClientFactory, serve: Callable[..., Awaitable[Server]]
) -> None:
    server = await serve(answering(ok(b"1"), ok(b"2"), ok(b"3")))
    client = make_client(server.port, idle_seconds=0.2)
    assert await fetch(client) == (200, b"1")
    assert await fetch(client) == (200, b"2")  # within idle_seconds: reused
    assert server.accepted == 1
    await asyncio.sleep(1.2)  # aiohttp drops idle connections on a timer of its own
    assert await fetch(client) == (200, b"3")
    assert server.accepted == 2


# -- errors


async def test_connection_refused_is_an_oserror(make_client: ClientFactory) -> None:
    client = make_client(free_port())
    with pytest.raises(OSError) as info:
        await get(client)
    assert not isinstance(info.value, TimeoutError)


async def test_no_answer_within_the_deadline_is_a_timeout(
    make_client: ClientFactory, serve: Callable[..., Awaitable[Server]]
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await asyncio.sleep(10)

    server = await serve(script)
    client = make_client(server.port)
    started = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        await get(client, timeout=0.3)
    assert not isinstance(info.value, ConnectTimeout)  # connected: the request went out
    assert time.monotonic() - started < 1.5


async def test_a_full_pool_is_a_connect_timeout_within_the_deadline(
    make_client: ClientFactory, serve: Callable[..., Awaitable[Server]]
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        await asyncio.sleep(10)  # the rest of the body is still to come

    server = await serve(script)
    client = make_client(server.port, limit=1)
    held = await get(client)  # mid-body: the one place stays taken
    started = time.monotonic()
    with pytest.raises(ConnectTimeout):
        await get(client, timeout=0.3)
    assert time.monotonic() - started < 1.5
    assert server.accepted == 1  # the second request never went out
    held.close()


async def test_a_fresh_connection_closed_without_answer_is_disconnected(
    make_client: ClientFactory, serve: Callable[..., Awaitable[Server]]
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        peer.writer.close()

    server = await serve(script)
    client = make_client(server.port)
    with pytest.raises(Disconnected) as info:
        await client.request("POST", "/v1/chat/completions", [], b"{}", timeout=2)
    assert info.value.reused is False


async def test_a_body_cut_short_is_a_response_error(
    make_client: ClientFactory, serve: Callable[..., Awaitable[Server]]
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf.")
        peer.writer.close()

    server = await serve(script)
    client = make_client(server.port)
    resp = await get(client)
    with pytest.raises(ResponseError):
        await resp.read(2.0)
    resp.close()


async def test_a_body_past_the_limit_is_body_too_large(
    make_client: ClientFactory, serve: Callable[..., Awaitable[Server]]
) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"8\r\n12345678\r\n" * 4
    server = await serve(answering(ok(b"x" * 100), chunked + b"0\r\n\r\n", ok(b"small")))
    client = make_client(server.port)
    for _ in range(2):  # told by Content-Length, then counted as the chunks come
        resp = await get(client)
        with pytest.raises(BodyTooLarge) as info:
            await resp.read(2.0, limit=20)
        assert info.value.limit == 20
        resp.release()
    resp = await get(client)
    assert await resp.read(2.0, limit=5) == b"small"  # at the limit: fine
    resp.release()


# -- TLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both
    signed by the CA (made with the openssl command: `cryptography` is not a
    dependency of this project)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make test certificates")
    d = tmp_path_factory.mktemp("certs")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-days", "2", "-subj", "/CN=chat-proxy test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", "ca.key", "-out", "ca.pem", cwd=d,
    )  # fmt: skip
    for name, usage, san in (
        ("server", "serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"),
        ("client", "clientAuth", ""),
    ):
        (d / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\n"
            f"authorityKeyIdentifier=keyid\nextendedKeyUsage={usage}\n{san}"
        )
        _openssl("req", *ec, "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
            cwd=d,
        )  # fmt: skip
    return d


def server_context(certs: Path, require_client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(certs / "ca.pem")
    return ctx


async def test_tls_verified_with_the_ca_file(
    make_client: ClientFactory, serve: Callable[..., Awaitable[Server]], certs: Path
) -> None:
    server = await serve(answering(ok(b"secret")), server_context(certs))
    ctx = tls_context(UpstreamTls(ca_file=str(certs / "ca.pem")))
    client = make_client(server.port, "https", ssl_context=ctx)
    assert await fetch(client) == (200, b"secret")


async def test_tls_without_the_ca_file_fails_verification(
    make_client: ClientFactory, serve: Callable[..., Awaitable[Server]], certs: Path
) -> None:
    server = await serve(answering(ok(b"secret")), server_context(certs))
    client = make_client(server.port, "https", ssl_context=tls_context(UpstreamTls()))
    with pytest.raises(ssl.SSLError):  # an OSError, as any failure to connect
        await get(client)


async def test_tls_with_verification_off_accepts_any_certificate(
    make_client: ClientFactory, serve: Callable[..., Awaitable[Server]], certs: Path
) -> None:
    server = await serve(answering(ok(b"secret")), server_context(certs))
    client = make_client(server.port, "https", ssl_context=tls_context(UpstreamTls(verify=False)))
    assert await fetch(client) == (200, b"secret")


async def test_mtls_the_client_certificate_is_accepted(
    make_client: ClientFactory, serve: Callable[..., Awaitable[Server]], certs: Path
) -> None:
    server = await serve(answering(ok(b"secret")), server_context(certs, require_client_cert=True))
    tls = UpstreamTls(
        ca_file=str(certs / "ca.pem"),
        cert_file=str(certs / "client.pem"),
        key_file=str(certs / "client.key"),
    )
    client = make_client(server.port, "https", ssl_context=tls_context(tls))
    assert await fetch(client) == (200, b"secret")
