"""Routes: which route a normalised path is, the scope it needs, and its upstream path."""

from __future__ import annotations

import pytest

from proxy.errors import ProxyError
from proxy.routes import CHAT, MODELS, PASSTHROUGH, SESSIONS_OFF, Route, Routes


async def _answer(ex: object) -> object:
    raise AssertionError("not called here")


FEATURE = Route(
    "things",
    {"GET": "things:read", "DELETE": "things:write"},
    paths=("/v1/things",),
    prefixes=("/v1/things/",),
    terminal=_answer,  # type: ignore[arg-type]
)


@pytest.mark.parametrize(
    ("method", "path", "route", "scope", "upstream"),
    [
        ("POST", "/v1/chat/completions", CHAT, "chat", "/chat/completions"),
        ("POST", "/chat/completions", CHAT, "chat", "/chat/completions"),
        ("GET", "/v1/models", MODELS, "models", "/models"),
        ("POST", "/v1/embeddings", PASSTHROUGH, "chat", "/embeddings"),
        ("GET", "/v1/things", FEATURE, "things:read", "/v1/things"),
        ("DELETE", "/v1/things/t1", FEATURE, "things:write", "/v1/things/t1"),
        ("GET", "/v1/sessions", SESSIONS_OFF, "sessions:read", "/v1/sessions"),
    ],
)
def test_classify(method: str, path: str, route: Route, scope: str, upstream: str) -> None:
    assert Routes((FEATURE,)).classify(method, path) == (route, scope, upstream)


def test_a_features_route_comes_before_the_reserved_one() -> None:
    mine = Route("sessions", {"GET": "sessions:read"}, paths=("/v1/sessions",), terminal=_answer)  # type: ignore[arg-type]
    assert Routes((mine,)).classify("GET", "/v1/sessions")[0] is mine


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/chat/completions", 405),
        ("POST", "/v1/models", 405),
        ("POST", "/v1/things", 405),
        ("GET", "/admin", 404),
    ],
)
def test_refusals(method: str, path: str, status: int) -> None:
    with pytest.raises(ProxyError) as err:
        Routes((FEATURE,)).classify(method, path)
    assert err.value.status == status
