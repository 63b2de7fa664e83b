"""A large answer no middleware reads streams through a real proxy process without
raising its resident memory: the backend's size bounds nothing in the proxy."""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hardening.fixtures import full_chain, sqlite_store

SIZE = 200 * 1024 * 1024
PIECE = b"\x00" * (64 * 1024)


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.fixture
def download_backend() -> Iterator[int]:
    """A backend whose every answer is a 200 MiB download (Content-Length, or chunked
    for a path ending in /chunked)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port: int = server.getsockname()[1]
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            path = head.split(b" ", 2)[1]
            if path.endswith(b"/chunked"):
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                )
                frame = b"%x\r\n" % len(PIECE) + PIECE + b"\r\n"
                for _ in range(SIZE // len(PIECE)):
                    conn.sendall(frame)
                conn.sendall(b"0\r\n\r\n")
            else:
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    b"Content-Length: %d\r\n\r\n" % SIZE
                )
                for _ in range(SIZE // len(PIECE)):
                    conn.sendall(PIECE)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield port
    stop.set()
    thread.join(5)
    server.close()


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/v1/files/f1/content", "/v1/files/f1/chunked"])
def test_a_200_mib_download_does_not_raise_the_proxys_memory(
    proxy_process: Any, download_backend: int, tmp_path: Path, path: str
) -> None:
    proxy = proxy_process(
        full_chain(f"http://127.0.0.1:{download_backend}/v1", sqlite_store(tmp_path / "s.db"))
    )
    assert proxy.proc is not None

    def download() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
        conn.request(
            "GET", path, headers={"Authorization": "Bearer sk-hard-alice-7Qm2xV9pLr4TzK8wYb3N"}
        )
        resp = conn.getresponse()
        assert resp.status == 200
        total = 0
        while True:
            data = resp.read(1024 * 1024)
            if not data:
                break
            total += len(data)
        conn.close()
        return total

    before = peak_rss_kib(proxy.proc.pid)
    assert download() == SIZE
    assert download() == SIZE
    after = peak_rss_kib(proxy.proc.pid)
    # the peak resident size grows by a few MiB at most, never by the answer's size
    print(f"peak RSS {before} KiB -> {after} KiB")
    assert after - before < 8 * 1024, (before, after)
