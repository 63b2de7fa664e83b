"""The hardening tests' pytest fixtures (their helpers are in tests/hardening/fixtures.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hardening.fixtures import ProxyProcess, free_port


@pytest.fixture
def proxy_process(tmp_path: Path) -> Iterator[Any]:
    """proxy_process(config_text) -> a started ProxyProcess; killed at the end."""
    started: list[ProxyProcess] = []

    def factory(config_text: str, name: str = "proxy") -> ProxyProcess:
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(config_text)
        p = ProxyProcess(cfg, free_port(), tmp_path / f"{name}.log")
        started.append(p)
        return p.start()

    yield factory
    for p in started:
        with contextlib.suppress(Exception):
            p.kill()
