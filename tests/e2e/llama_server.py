"""Start/stop a real llama.cpp server (llama-cpp-python[server]) for e2e tests.

The server lives in its own virtualenv, installed by
``scripts/install-llama-server.sh`` into
``${CHAT_PROXY_CACHE:-~/.cache/chat-proxy}/llama-venv``; ``LLAMA_SERVER_PYTHON``
points at another interpreter that has ``llama_cpp.server`` importable.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NamedTuple

INSTALL_HINT = "llama-cpp-python server not installed: run scripts/install-llama-server.sh"


def cache_dir() -> Path:
    """The chat-proxy cache root: ``$CHAT_PROXY_CACHE`` or ``~/.cache/chat-proxy``."""
    env = os.environ.get("CHAT_PROXY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "chat-proxy"


def find_llama_server_python() -> Path | None:
    """The python of the llama server venv, or None when it is not installed.

    ``LLAMA_SERVER_PYTHON`` overrides the default
    ``<cache_dir>/llama-venv/bin/python``. The interpreter is only checked to
    exist and be executable (importing ``llama_cpp.server`` takes ~1 s; a broken
    install shows up as a start-up failure with the server log attached).
    """
    env = os.environ.get("LLAMA_SERVER_PYTHON")
    candidate = Path(env) if env else cache_dir() / "llama-venv" / "bin" / "python"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LlamaBackend(NamedTuple):
    """What the ``llama_backend`` fixture yields: ``base_url, model = llama_backend``."""

    base_url: str  # http://127.0.0.1:PORT/v1
    model: str  # the model id /v1/models reports


class LlamaServerError(RuntimeError):
    """The llama server failed to start or to answer in time."""


@dataclass
class LlamaServer:
    """A running ``python -m llama_cpp.server`` subprocess."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    model_path: Path
    log_path: Path
    model_id: str = ""
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"{self.root_url}/v1"

    def log_tail(self, n_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout`` s)."""
        stop_llama_server(self, timeout=timeout)


def _get_json(url: str, timeout: float) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_for_llama_server(server: LlamaServer, timeout: float = 60.0) -> str:
    """Poll ``GET /v1/models`` until it answers; return the first model id."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise LlamaServerError(
                f"llama server exited with code {server.process.returncode} during start-up; "
                f"log {server.log_path}:\n{server.log_tail()}"
            )
        try:
            body = _get_json(f"{server.base_url}/models", timeout=2.0)
        except (OSError, ValueError) as exc:  # URLError/ConnectionError are OSErrors
            last_error = exc
            time.sleep(0.1)
            continue
        data = body.get("data") if isinstance(body, dict) else None
        if isinstance(data, list) and data and isinstance(data[0], dict) and data[0].get("id"):
            return str(data[0]["id"])
        raise LlamaServerError(f"unexpected /v1/models answer: {body!r}")
    raise LlamaServerError(
        f"llama server did not answer {server.base_url}/models within {timeout:.0f}s "
        f"(last error: {last_error!r}); log {server.log_path}:\n{server.log_tail()}"
    )


def start_llama_server(
    model_path: Path,
    *,
    python: Path | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    n_ctx: int = 512,
    model_alias: str | None = None,
    log_path: Path | None = None,
    extra_args: list[str] | None = None,
    timeout: float = 60.0,
) -> LlamaServer:
    """Start ``python -m llama_cpp.server`` on ``host:port`` and wait until ready.

    ``port`` defaults to a free port; ``model_alias`` (the id that
    ``/v1/models`` reports) defaults to the model file's path. Server output goes
    to ``log_path`` (default: next to the model). Raises ``LlamaServerError`` if
    the server is not installed, exits, or does not answer within ``timeout``.
    """
    python = python or find_llama_server_python()
    if python is None:
        raise LlamaServerError(INSTALL_HINT)
    port = port or free_port(host)
    log_path = log_path or model_path.with_name(f"llama-server-{port}.log")
    cmd = [
        str(python),
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_path),
        "--host",
        host,
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        # The machine has 2 cores and the proxy + tests run next to the server.
        "--n_threads",
        "1",
        "--n_threads_batch",
        "1",
        "--seed",
        "42",
        "--verbose",
        "false",
    ]
    if model_alias:
        cmd += ["--model_alias", model_alias]
    cmd += extra_args or []
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("VIRTUAL_ENV", None)
    log_file = log_path.open("wb")
    try:
        process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(model_path.parent),
        )
    except BaseException:
        log_file.close()
        raise
    server = LlamaServer(
        process=process,
        host=host,
        port=port,
        model_path=model_path,
        log_path=log_path,
        _log_file=log_file,
    )
    try:
        server.model_id = wait_for_llama_server(server, timeout=timeout)
    except BaseException:
        stop_llama_server(server)
        raise
    return server


def stop_llama_server(server: LlamaServer, timeout: float = 10.0) -> None:
    """Stop the server process (idempotent)."""
    proc = server.process
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    if server._log_file is not None and not server._log_file.closed:
        server._log_file.close()


class LlamaFleet:
    """Separate llama server processes on their own free ports, serving one model file:
    the replicas of one upstream. ``base_urls[i]`` is replica i's URL (``/v1``
    included); ``stopped(i)`` takes one down for the length of a ``with`` block."""

    def __init__(
        self,
        model_path: Path,
        size: int,
        *,
        python: Path | None = None,
        model_alias: str | None = None,
    ) -> None:
        self.model_path = model_path
        self.python = python
        self.model_alias = model_alias
        self._starts = 0
        self.servers: list[LlamaServer] = []
        try:
            for _ in range(size):
                self.servers.append(self._start(None))
        except BaseException:
            self.close()
            raise

    def _start(self, port: int | None) -> LlamaServer:
        self._starts += 1
        log = self.model_path.with_name(f"llama-fleet-{self._starts}.log")
        return start_llama_server(
            self.model_path,
            python=self.python,
            port=port,
            model_alias=self.model_alias,
            log_path=log,
        )

    @property
    def base_urls(self) -> list[str]:
        return [s.base_url for s in self.servers]

    @property
    def model(self) -> str:
        return self.servers[0].model_id

    def running(self, index: int) -> bool:
        return self.servers[index].process.poll() is None

    def stop(self, index: int) -> None:
        """Stop replica ``index`` (its port then refuses connections)."""
        self.servers[index].stop()

    def restart(self, index: int) -> None:
        """Start replica ``index`` again on the same port (so its URL, and so the
        proxy's ring, stays the same); a no-op when it is running."""
        old = self.servers[index]
        if old.process.poll() is None:
            return
        old.stop()  # closes its log
        self.servers[index] = self._start(old.port)

    @contextmanager
    def stopped(self, index: int) -> Iterator[None]:
        """Replica ``index`` down inside the block, up again (same URL) after it."""
        self.stop(index)
        try:
            yield
        finally:
            self.restart(index)

    def close(self) -> None:
        for server in self.servers:
            server.stop()
