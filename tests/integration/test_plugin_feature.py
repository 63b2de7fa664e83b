"""A user's own feature with a route and stored state, loaded by import path (the
README's example, tests/plugins/feedback): its route runs behind the whole chain."""

from __future__ import annotations

from pathlib import Path

from tests.fixtures import BASIC, Backend, ProxyFactory

ALICE, BOB = "sk-feedback-alice-1", "sk-feedback-bob-2"


def config(path: Path) -> str:
    return (
        BASIC
        + f"""
middleware:
  - type: auth
    keys:
      - {{id: alice, key: {ALICE}, scopes: [chat]}}
      - {{id: bob, key: {BOB}, scopes: [models]}}
  - type: tests.plugins.feedback:feedback
    path: "{path}"
"""
    )


async def test_a_features_route_stores_per_caller_behind_auth(
    make_proxy: ProxyFactory, backend: Backend, tmp_path: Path
) -> None:
    db = tmp_path / "feedback.db"
    client = await make_proxy(config(db), backend)
    alice = {"Authorization": f"Bearer {ALICE}"}
    resp = await client.post(
        "/v1/feedback", json={"request_id": "req_1", "rating": 5}, headers=alice
    )
    assert resp.status == 201
    resp = await client.get("/v1/feedback", headers=alice)
    assert (await resp.json())["data"] == [{"request_id": "req_1", "rating": 5}]
    # auth runs for the route: no key, or a key without its scope, is refused
    assert (await client.get("/v1/feedback")).status == 401
    resp = await client.get("/v1/feedback", headers={"Authorization": f"Bearer {BOB}"})
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "missing_scope"
    # a bad body gets the OpenAI error shape
    resp = await client.post("/v1/feedback", data=b"[1]", headers=alice)
    assert resp.status == 400
    assert backend.seen == []  # never passed through to the backend

    # the state is the feature's own file: a new proxy on it sees it
    again = await make_proxy(config(db), backend)
    resp = await again.get("/v1/feedback", headers=alice)
    assert (await resp.json())["data"] == [{"request_id": "req_1", "rating": 5}]
