"""Fixtures for end-to-end tests against a real llama.cpp server backend."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import pytest

# Works both with tests/e2e as a package and as a plain (rootdir-inserted) directory.
try:
    from .llama_model import MODEL_NAME, write_tiny_llama_gguf
    from .llama_server import (
        INSTALL_HINT,
        LlamaBackend,
        LlamaFleet,
        find_llama_server_python,
        start_llama_server,
    )
except ImportError:
    from llama_model import MODEL_NAME, write_tiny_llama_gguf
    from llama_server import (
        INSTALL_HINT,
        LlamaBackend,
        LlamaFleet,
        find_llama_server_python,
        start_llama_server,
    )


def _skip_or_fail(reason: str) -> NoReturn:
    """Skip locally; fail under CI=true, where the backend must be installed."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: e2e backend is required)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def llama_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaBackend]:
    """A llama-cpp-python server on a free 127.0.0.1 port serving a tiny random model.

    Yields ``LlamaBackend(base_url, model)``; the model id is the one the server
    reports in ``/v1/models`` (the alias ``tiny-random-llama``).
    """
    python = find_llama_server_python()
    if python is None:
        _skip_or_fail(INSTALL_HINT)
    workdir = tmp_path_factory.mktemp("llama")
    model_path = workdir / "tiny-llama.gguf"
    write_tiny_llama_gguf(model_path)
    server = start_llama_server(model_path, python=python, model_alias=MODEL_NAME)
    try:
        yield LlamaBackend(base_url=server.base_url, model=server.model_id)
    finally:
        server.stop()


# -- the proxy in front of the llama backend ---------------------------------------

LlamaProxyFactory = Callable[..., Awaitable[Any]]


@pytest.fixture
async def llama_proxy(make_proxy: Any, llama_backend: LlamaBackend) -> LlamaProxyFactory:
    """llama_proxy(yaml_text, env=None) -> a TestClient of the proxy, in process.

    ``{llama}`` in the YAML becomes the llama server's base URL (``/v1`` included)
    and ``{llama_model}`` the model id it serves.
    """

    async def factory(text: str, env: dict[str, str] | None = None) -> Any:
        text = text.replace("{llama}", llama_backend.base_url)
        text = text.replace("{llama_model}", llama_backend.model)
        return await make_proxy(text, None, env)

    return factory


# -- a fleet of llama servers --------------------------------------------------------


@pytest.fixture(scope="session")
def llama_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaFleet]:
    """Two llama-cpp-python servers (separate processes, free 127.0.0.1 ports, the same
    tiny model file), apart from ``llama_backend``. A test that stops one does so with
    ``with llama_fleet.stopped(i):``, which starts it again on the same port after."""
    python = find_llama_server_python()
    if python is None:
        _skip_or_fail(INSTALL_HINT)
    workdir = tmp_path_factory.mktemp("llama-fleet")
    model_path = workdir / "tiny-llama.gguf"
    write_tiny_llama_gguf(model_path)
    fleet = LlamaFleet(model_path, 2, python=python, model_alias=MODEL_NAME)
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
async def llama_fleet_proxy(make_proxy: Any, llama_fleet: LlamaFleet) -> LlamaProxyFactory:
    """llama_fleet_proxy(yaml_text, env=None) -> a TestClient of the proxy, in process.

    ``{replica0}``, ``{replica1}`` in the YAML become the fleet's base URLs and
    ``{llama_model}`` the model id they serve. Every replica is checked to be running
    first (a test before may have failed while one was stopped)."""

    async def factory(text: str, env: dict[str, str] | None = None) -> Any:
        for i, url in enumerate(llama_fleet.base_urls):
            llama_fleet.restart(i)  # same port, so the same URL
            text = text.replace(f"{{replica{i}}}", url)
        text = text.replace("{llama_model}", llama_fleet.model)
        return await make_proxy(text, None, env)

    return factory


# -- the OpenAI Node SDK as a client ----------------------------------------------

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE_HINT = "run `make e2e-deps` (npm install in tests/e2e/node)"


class NodeSDK:
    """Runs ``node <script> <base_url> <api_key> <params-json>`` in tests/e2e/node and
    returns the JSON object the script prints. Runs as an asyncio subprocess, so an
    in-process proxy on the same event loop keeps serving while it waits."""

    def __init__(self, node: str) -> None:
        self.node = node

    async def run(
        self,
        base_url: str,
        api_key: str,
        params: dict[str, Any] | None = None,
        *,
        script: str = "chat.mjs",
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        args = [str(NODE_DIR / script), base_url, api_key]
        if params is not None:
            args.append(json.dumps(params))
        proc = await asyncio.create_subprocess_exec(
            self.node,
            *args,
            cwd=str(NODE_DIR),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode == 0, f"node {script} exited {proc.returncode}:\n{err.decode()}"
        result = json.loads(out)
        assert isinstance(result, dict), out
        return result


@pytest.fixture(scope="session")
def node_sdk() -> NodeSDK:
    """The OpenAI Node SDK runner; skips locally (fails under CI=true) without
    ``node`` or without tests/e2e/node/node_modules."""
    node = shutil.which("node")
    if node is None:
        _skip_or_fail(f"node is not installed: install Node.js 18+, then {NODE_HINT}")
    if not (NODE_DIR / "node_modules" / "openai" / "package.json").is_file():
        _skip_or_fail(f"the OpenAI Node SDK is not installed: {NODE_HINT}")
    return NodeSDK(node)


# -- curl as a client --------------------------------------------------------------


class CurlResult(NamedTuple):
    status: int
    headers: dict[str, str]  # lower-case names; the last value of a repeated header
    body: bytes


class Curl:
    """Runs the `curl` command line (as an asyncio subprocess, so that an in-process
    proxy keeps serving) and returns the status, headers and body it got."""

    def __init__(self, curl: str, workdir: Path) -> None:
        self.curl = curl
        self.workdir = workdir

    async def run(self, url: str, *args: str, timeout: float = 30.0) -> CurlResult:
        out = self.workdir / f"body-{uuid.uuid4().hex}"
        head = out.with_suffix(".headers")
        proc = await asyncio.create_subprocess_exec(
            self.curl,
            "-sS",
            "-o",
            str(out),
            "-D",
            str(head),
            "-w",
            "%{http_code}",
            *args,
            url,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            status, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode == 0, f"curl exited {proc.returncode}: {err.decode()}"
        headers: dict[str, str] = {}
        for line in head.read_text("latin-1").splitlines()[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        body = out.read_bytes()
        out.unlink()
        head.unlink()
        return CurlResult(int(status), headers, body)


@pytest.fixture(scope="session")
def curl(tmp_path_factory: pytest.TempPathFactory) -> Curl:
    """The curl runner; skips locally (fails under CI=true) without `curl`."""
    found = shutil.which("curl")
    if found is None:
        _skip_or_fail("curl is not installed")
    return Curl(found, tmp_path_factory.mktemp("curl"))
