"""server.event_loop: which event loop `chat-proxy serve` runs on."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
import uvloop

from proxy.config import ConfigError
from proxy.loader import load_text
from proxy.server import loop_factory

BASE = "upstreams: [{name: a, url: 'echo:'}]\n"


def test_auto_and_uvloop_run_on_uvloop_asyncio_on_the_standard_loop() -> None:
    for choice in ("auto", "uvloop"):
        factory = loop_factory(choice)
        assert factory is not None
        loop = factory()
        try:
            assert isinstance(loop, uvloop.Loop)
        finally:
            loop.close()
    assert loop_factory("asyncio") is None
    with asyncio.Runner(loop_factory=loop_factory("asyncio")) as runner:
        assert not isinstance(runner.get_loop(), uvloop.Loop)


def test_the_default_is_auto_and_other_values_are_refused() -> None:
    assert load_text(BASE).server.event_loop == "auto"
    assert load_text(BASE + "server: {event_loop: asyncio}\n").server.event_loop == "asyncio"
    with pytest.raises(ConfigError) as err:
        load_text(BASE + "server: {event_loop: trio}\n")
    assert any(e.startswith("server.event_loop:") for e in err.value.errors)


def test_uvloop_asked_for_but_not_installed_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a)
    )
    with pytest.raises(ConfigError) as err:
        load_text(BASE + "server: {event_loop: uvloop}\n")
    assert any("uvloop is not installed" in e for e in err.value.errors)
    # auto falls back to the standard loop instead
    assert load_text(BASE + "server: {event_loop: auto}\n").server.event_loop == "auto"
