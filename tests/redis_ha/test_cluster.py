"""Redis Cluster for real: three masters started by the tests (tests/redis_ha/servers.py).

Every multi-key operation keeps its keys in one hash slot (an owner's session keys and
responses carry the owner's hash tag, a client's limit keys its own), the keys of
different owners spread over the masters, and two proxy processes sharing the cluster
admit exactly a limit's worth of a burst between them. The store and limiter contract
suites run on the cluster too (tests/contract)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import redis
from redis.crc import key_slot

from proxy.config import StoreConfig
from proxy.ratelimit import Quota
from proxy.ratelimit.redis import open_limiter
from proxy.sessions.store import StoredResponse, TurnRecord, open_store
from tests.fixtures import chat_body
from tests.redis_ha.proxies import config, proxies
from tests.redis_ha.servers import Cluster


def keys_by_node(cluster: Cluster, prefix: str) -> dict[int, list[str]]:
    """The keys under `prefix` on each master (SCAN node by node)."""
    out: dict[int, list[str]] = {}
    for node in cluster.nodes:
        client = redis.Redis(port=node.port, decode_responses=True)
        out[node.port] = sorted(client.scan_iter(match=prefix + "*", count=1000))
        client.close()
    return out


def record(owner: str, sid: str, n: int, digests: tuple[str, ...] = ()) -> TurnRecord:
    return TurnRecord(
        owner=owner,
        session_id=sid,
        at=1_700_000_000.0 + n,
        source="header",
        key_id=owner,
        model="m",
        turn={"created": n, "messages": [{"role": "user", "content": f"{sid} {n}"}]},
        digests=digests,
        digest_ttl=3600,
    )


async def test_each_owners_keys_share_a_slot_and_owners_spread_over_the_masters(
    redis_cluster: Cluster,
) -> None:
    prefix = f"slots-{uuid.uuid4().hex[:8]}:"
    cfg = StoreConfig(**redis_cluster.store_config(prefix))
    store = await open_store(cfg)
    limiter = open_limiter(cfg, None)
    owners = [f"key-{i}" for i in range(12)]
    try:
        for owner in owners:
            await store.record_turns(
                [record(owner, "s1", 1, ("d1", "d2")), record(owner, "s2", 2, ("d3",))]
            )
            await store.put_response(
                StoredResponse("resp_1", owner, 1_700_000_000.0, "s1", '{"id":"resp_1"}', "[]")
            )
            decision = await limiter.acquire(
                owner, Quota(requests_per_minute=10, tokens_per_minute=100, max_concurrent=2), 5
            )
            assert decision.allowed
        assert await store.find_session("key-3", "d3") == "s2"
        assert await store.purge(1_700_000_001.5) == len(owners)  # every s1
        assert await store.get_response("key-3", "resp_1") is None  # went with s1
    finally:
        await store.close()
        await limiter.close()

    by_node = keys_by_node(redis_cluster, prefix)
    keys = [k for node in by_node.values() for k in node]
    # every key but the two purge indexes names its owner's (or client's) hash tag
    indexes = {f"{prefix}sessions", f"{prefix}responses"}
    tagged = [k for k in keys if k not in indexes]
    assert all("{" in k for k in tagged), tagged
    slots_of: dict[str, set[int]] = {}
    for k in tagged:
        tag = k[k.index("{") + 1 : k.index("}")]
        slots_of.setdefault(tag, set()).add(key_slot(k.encode()))
    assert all(len(s) == 1 for s in slots_of.values()), slots_of
    # 12 owners' sessions and 12 clients' counters: on every master
    assert all(by_node.values()), {port: len(k) for port, k in by_node.items()}
    kinds = Counter(k[len(prefix) :].split(":", 1)[0] for k in keys)
    assert kinds["session"] == len(owners) and kinds["rl"] == 3 * len(owners), kinds


async def test_two_proxy_processes_enforce_one_limit_on_the_cluster(
    redis_cluster: Cluster, tmp_path: Path
) -> None:
    store = redis_cluster.store_config(f"exact-{uuid.uuid4().hex[:8]}:")
    middleware = """
  - type: tests.ratelimit.fixtures:keyed
  - type: rate_limit
    requests_per_minute: 50
  - type: session
"""
    text = config(store, middleware)
    async with (
        proxies(tmp_path, [text, text]) as pair,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
    ):

        async def one(i: int, key: str) -> int:
            url = pair[i % 2].base + "/v1/chat/completions"
            body = chat_body(f"request {i}", model="echo")
            async with http.post(url, json=body, headers={"X-Test-Key": key}) as resp:
                await resp.read()
                return resp.status

        # the connections (client to proxies, proxies to every master) opened under
        # another key first, so that the burst takes well under the 1.2 s in which one
        # request comes back
        await asyncio.gather(*[one(i, "warm-up") for i in range(200)])
        statuses = await asyncio.gather(*[one(i, "burst") for i in range(200)])
        # 100 requests reached each proxy: limits counted per process would admit 100
        assert Counter(statuses) == {200: 50, 429: 150}

        # and the sessions the proxies recorded are on the cluster: one continues
        # through the other proxy (the conversation's digest found there)
        first = {"model": "echo", "messages": [{"role": "user", "content": "hello"}]}
        async with http.post(
            pair[0].base + "/v1/chat/completions", json=first, headers={"X-Test-Key": "talker"}
        ) as resp:
            assert resp.status == 200
            sid = resp.headers["X-Session-Id"]
            reply = (await resp.json())["choices"][0]["message"]
        follow: dict[str, Any] = {
            "model": "echo",
            "messages": [*first["messages"], reply, {"role": "user", "content": "again"}],
        }
        talker = {"X-Test-Key": "talker"}
        # (the Sessions API writes the first proxy's queued turn before it answers)
        async with http.get(pair[0].base + f"/v1/sessions/{sid}", headers=talker) as resp:
            assert (await resp.json())["turn_count"] == 1
        async with http.post(
            pair[1].base + "/v1/chat/completions", json=follow, headers=talker
        ) as resp:
            assert resp.status == 200
            assert resp.headers["X-Session-Id"] == sid
        async with http.get(pair[1].base + f"/v1/sessions/{sid}", headers=talker) as resp:
            got = json.loads(await resp.read())
        assert got["turn_count"] == 2
