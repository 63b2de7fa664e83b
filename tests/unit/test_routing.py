"""Upstreams: which serve a model and in what order, passive health, and targets."""

from __future__ import annotations

import time

from proxy.config import UpstreamConfig
from proxy.routing import Upstream, Upstreams


def cfg(name: str, models: tuple[str, ...] = ("*",), **extra: object) -> UpstreamConfig:
    return UpstreamConfig.model_validate(
        {"name": name, "url": f"http://127.0.0.1:1/{name}/v1", "models": models, **extra}
    )


def test_candidates_follow_the_config_by_model_glob() -> None:
    ups = Upstreams([cfg("llama", ("llama*",)), cfg("qwen", ("qwen*",)), cfg("any")])
    assert [u.name for u in ups.candidates("llama3.1:8b")] == ["llama", "any"]
    assert [u.name for u in ups.candidates("qwen2.5")] == ["qwen", "any"]
    assert [u.name for u in ups.candidates(None)] == ["any"]
    assert [u.name for u in ups.candidates("gpt-4o")] == ["any"]


def test_weighted_upstreams_share_the_load() -> None:
    ups = Upstreams([cfg("a", weight=6), cfg("b", weight=2), cfg("c")])
    firsts = [ups.candidates("m")[0].name for _ in range(2000)]
    # a three times as often as b, c (no weight) always last
    assert 1300 < firsts.count("a") < 1700
    assert firsts.count("c") == 0
    assert {u.name for u in ups.candidates("m")} == {"a", "b", "c"}


def test_the_circuit_opens_after_failures_and_closes_after_its_cooldown() -> None:
    up = Upstream(cfg("a", circuit={"failures": 2, "cooldown": 0.05})).replicas[0]
    up.pool = object()  # type: ignore[assignment]  # started, as far as state() knows
    up.record(False)
    assert not up.is_open and up.state() == "degraded"
    up.record(False)
    assert up.is_open and up.state() == "open"
    time.sleep(0.06)
    assert not up.is_open
    up.record(True)
    assert up.state() == "ok"


def test_targets_keep_the_base_path_and_the_query_as_it_came() -> None:
    up = Upstream(cfg("a")).replicas[0]
    assert up.target("/chat/completions", "") == "/a/v1/chat/completions"
    assert up.target("/embeddings", "x=1&y=%20") == "/a/v1/embeddings?x=1&y=%20"
    assert up.target("/files/a b", "") == "/a/v1/files/a%20b"
