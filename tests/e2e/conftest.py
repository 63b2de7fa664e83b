"""Fixtures for end-to-end tests against a real llama.cpp server backend."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NoReturn

import pytest

# Works both with tests/e2e as a package and as a plain (rootdir-inserted) directory.
try:
    from .llama_model import MODEL_NAME, write_tiny_llama_gguf
    from .llama_server import (
        INSTALL_HINT,
        LlamaBackend,
        find_llama_server_python,
        start_llama_server,
    )
except ImportError:
    from llama_model import MODEL_NAME, write_tiny_llama_gguf
    from llama_server import (
        INSTALL_HINT,
        LlamaBackend,
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
