"""The chain: factories that return a middleware or a Feature, the order checks, the
hand-offs a reload passes on, and the nesting of middlewares."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy.chain import BuildContext, Feature, build_chain, compose, order_warnings
from proxy.config import ConfigError
from proxy.exchange import Exchange, Handler, Middleware
from proxy.loader import load_text
from proxy.routes import CHAT

UPSTREAM = "upstreams: [{name: a, url: 'http://127.0.0.1:1/v1'}]\n"


def chain_of(*types: str) -> str:
    entries = "".join(f"  - type: {t}\n" for t in types)
    keys = "    keys: [{id: k, key: sk-test-chain-1}]\n"
    return (
        UPSTREAM + "middleware:\n" + entries.replace("  - type: auth\n", "  - type: auth\n" + keys)
    )


def test_entries_before_auth_are_reported_with_both_paths() -> None:
    config = load_text(chain_of("rate_limit", "session", "auth", "model_override"))
    assert order_warnings(config.chain) == [
        "middleware[0].rate_limit: stands before middleware[2].auth; "
        "callers are counted by their address, not by their key",
        "middleware[1].session: stands before middleware[2].auth; "
        "sessions are kept per address, and a key never sees its own",
    ]


def test_a_chain_in_order_or_without_auth_has_no_warning() -> None:
    assert order_warnings(load_text(chain_of("auth", "rate_limit", "session")).chain) == []
    assert order_warnings(load_text(chain_of("rate_limit", "validate")).chain) == []


def order(tag: str, seen: list[str]) -> Middleware:
    async def mw(ex: Exchange, call_next: Handler) -> web.StreamResponse:
        seen.append(f"{tag} in")
        response = await call_next(ex)
        seen.append(f"{tag} out")
        return response

    return mw


async def test_requests_pass_top_to_bottom_and_responses_back() -> None:
    seen: list[str] = []

    async def terminal(ex: Exchange) -> web.StreamResponse:
        seen.append("terminal")
        return web.Response(status=204)

    handler = compose([order("a", seen), order("b", seen)], terminal)
    ex = Exchange(
        request=make_mocked_request("POST", "/v1/chat/completions"),
        route=CHAT,
        scope="chat",
        request_id="r",
    )
    assert (await handler(ex)).status == 204
    assert seen == ["a in", "b in", "terminal", "b out", "a out"]


class Counter:
    pass


def counted(options: dict[str, Any], ctx: BuildContext) -> Feature:
    inherited = ctx.inherit(Counter)

    async def mw(ex: Exchange, call_next: Handler) -> web.StreamResponse:
        return await call_next(ex)

    return Feature(mw, handoff=inherited or Counter())


def not_a_middleware(options: dict[str, Any], ctx: BuildContext) -> Any:
    return 42


def test_a_reload_hands_state_on_by_its_type() -> None:
    config = load_text(UPSTREAM + "middleware:\n  - type: tests.unit.test_chain:counted\n")
    first = build_chain(BuildContext(config=config))
    [handed] = first.handoffs
    second = build_chain(BuildContext(config=config, previous=first.handoffs))
    assert second.handoffs == (handed,)  # the same object, not a new one
    fresh = build_chain(BuildContext(config=config))
    assert fresh.handoffs[0] is not handed


def test_a_factory_that_returns_no_middleware_is_a_config_error() -> None:
    config = load_text(UPSTREAM + "middleware:\n  - type: tests.unit.test_chain:not_a_middleware\n")
    with pytest.raises(ConfigError) as err:
        build_chain(BuildContext(config=config))
    assert err.value.errors == [
        "middleware[0].tests.unit.test_chain:not_a_middleware: "
        "the factory did not return a middleware"
    ]


@pytest.mark.parametrize(
    ("store", "shown"),
    [
        ("{backend: memory}", "store: memory (in process)"),
        (
            "{backend: postgres, dsn: 'postgresql://u:secret@db:5432/x'}",
            "store: postgres (postgresql://u:***@db:5432/x)",
        ),
        (
            "{backend: redis, sentinel: {hosts: ['s1:26379', 's2:26379'], service: m}}",
            "store: redis (sentinel s1:26379, s2:26379, service m)",
        ),
        ("{backend: redis, cluster: true}", "store: redis (redis://127.0.0.1:6379/0 (cluster))"),
    ],
)
def test_check_describes_every_store_without_its_secrets(store: str, shown: str) -> None:
    from proxy.chain import describe
    from proxy.loader import load_text

    text = f"upstreams:\n  - name: a\n    url: 'echo:'\nstore: {store}\n"
    lines = describe(load_text(text, env={}))
    assert shown in lines and not any("secret" in line for line in lines)
