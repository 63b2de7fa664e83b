"""Redis Sentinel for real: a master, a replica and three sentinels started by the test
(tests/redis_ha/servers.py), two proxy processes finding the master through them, and
the master killed (SIGKILL) under traffic.

While the sentinels fail it over, each proxy follows its on_store_error (allow: 200s,
deny: 503 with Retry-After; never a 500, never a wait past the limiter's bound); after
it the limits are exact again, the counts from before the failover still hold, and
every session turn a client was answered for is in its session once."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import StoreConfig
from proxy.sessions.store import TurnRecord, open_store
from proxy.sessions.writer import Writer
from tests.fixtures import chat_body
from tests.redis_ha.proxies import Proxy, config, proxies
from tests.redis_ha.servers import SentinelSet, Server, admin

# the most a request may take while the store fails over: the limiter gives Redis a
# second (proxy/ratelimit/redis.py CALL_TIMEOUT), and the rest is the proxy's own
WINDOW_BOUND = 1.5
TALKER = {"X-Test-Key": "talker"}


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    deployment = SentinelSet(tmp_path)
    deployment.start()
    yield deployment
    deployment.stop()


MIDDLEWARE = """
  - type: tests.ratelimit.fixtures:keyed
    keys: {early: {requests_per_minute: 3}}
  - type: rate_limit
    requests_per_minute: 50
    on_store_error: POLICY
  - type: session
"""


class Answer:
    def __init__(self, status: int, headers: Any, body: bytes, elapsed: float) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.elapsed = elapsed

    def json(self) -> Any:
        return json.loads(self.body)


async def test_a_killed_master_is_followed_and_nothing_acknowledged_is_lost(
    sentinels: SentinelSet, tmp_path: Path
) -> None:
    store = sentinels.store_config(f"ha-{uuid.uuid4().hex[:8]}:")
    texts_of = [config(store, MIDDLEWARE.replace("POLICY", p)) for p in ("allow", "deny")]
    async with (
        proxies(tmp_path, texts_of) as (allow, deny),
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
    ):

        async def post(
            proxy: Proxy, key: str, text: str = "Hi", session: str | None = None
        ) -> Answer:
            headers = {"X-Test-Key": key}
            if session is not None:
                headers["X-Session-Id"] = session
            started = time.monotonic()
            async with http.post(
                proxy.base + "/v1/chat/completions",
                json=chat_body(text, model="echo"),
                headers=headers,
            ) as resp:
                body = await resp.read()
                return Answer(resp.status, resp.headers, body, time.monotonic() - started)

        async def conversation() -> Any:
            # the Sessions API writes the proxy's queued turns first
            async with http.get(allow.base + "/v1/sessions/conv-1", headers=TALKER) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json()

        # before: a key spends its 3 a minute through both proxies, and a
        # conversation records its turns
        assert [(await post(p, "early")).status for p in (allow, deny, allow, deny)] == [
            200,
            200,
            200,
            429,
        ]
        texts: list[str] = []
        for i in range(5):
            texts.append(f"before {i}")
            assert (await post(allow, "talker", texts[-1], "conv-1")).status == 200
        assert (await conversation())["turn_count"] == 5

        old = sentinels.master_port()
        sentinels.master.kill()
        killed = time.monotonic()
        failover = asyncio.create_task(asyncio.to_thread(sentinels.wait_failover, old))

        # during: requests keep coming to both proxies until the sentinels have
        # promoted the replica
        seen: dict[str, Counter[int]] = {"allow": Counter(), "deny": Counter()}
        slowest = 0.0
        i = 0
        while not failover.done():
            texts.append(f"during {i}")
            a, d = await asyncio.gather(
                post(allow, "talker", texts[-1], "conv-1"), post(deny, "talker")
            )
            for name, answer in (("allow", a), ("deny", d)):
                seen[name][answer.status] += 1
                slowest = max(slowest, answer.elapsed)
                if answer.status == 503:
                    assert answer.headers["Retry-After"] == "1"
                    assert answer.json()["error"]["code"] == "rate_limit_store_unavailable"
            assert a.status == 200, a.body
            i += 1
            await asyncio.sleep(0.02)
        new = await failover
        window = time.monotonic() - killed
        assert new != old
        assert set(seen["allow"]) == {200}
        assert set(seen["deny"]) <= {200, 503} and seen["deny"][503] > 0
        assert slowest < WINDOW_BOUND

        # after: both proxies count in the new master again (a limiter waits a second
        # after a failure before it tries Redis again)
        async def counted(proxy: Proxy) -> bool:
            answer = await post(proxy, f"probe-{uuid.uuid4().hex[:6]}")
            return answer.status == 200 and "x-ratelimit-remaining-requests" in answer.headers

        deadline = time.monotonic() + 5
        while not (await counted(allow) and await counted(deny)):
            assert time.monotonic() < deadline, "the proxies did not count in the new master"
            await asyncio.sleep(0.1)
        recovered = time.monotonic() - killed

        # the count from before the failover holds (it was on the replica too)
        assert (await post(allow, "early")).status == 429
        assert (await post(deny, "early")).status == 429
        # and a burst across both proxies gets exactly its 50 (once the proxies hold
        # their connections to the new master, so that it takes well under the 1.2 s
        # in which one request comes back)
        await asyncio.gather(*[post(allow if n % 2 else deny, "warm-up") for n in range(200)])
        burst = await asyncio.gather(*[post(allow if n % 2 else deny, "burst") for n in range(200)])
        assert Counter(a.status for a in burst) == {200: 50, 429: 150}

        # every turn a client was answered for, once, in order
        deadline = time.monotonic() + 8
        while True:
            got = await conversation()
            if got["turn_count"] >= len(texts) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert [t["messages"][0]["content"] for t in got["turns"]] == texts
        assert got["turn_count"] == len(texts)
    print(
        f"\nfailover in {window:.2f} s; meanwhile allow answered {dict(seen['allow'])}, "
        f"deny {dict(seen['deny'])}; slowest request {slowest * 1000:.0f} ms; limits "
        f"exact again {recovered:.2f} s after the kill; {len(texts)} turns, none lost"
    )


def turn(session_id: str, text: str) -> TurnRecord:
    return TurnRecord(
        owner="k",
        session_id=session_id,
        at=time.time(),
        source="header",
        key_id="k",
        model="m",
        turn={"created": 1, "messages": [{"role": "user", "content": text}]},
        prompt_tokens=1,
        total_tokens=1,
    )


async def test_a_batch_refused_with_readonly_is_written_once_the_server_takes_writes(
    tmp_path: Path,
) -> None:
    """The store's server is (still) a replica, as a demoted master is: writes are
    refused with READONLY, the writer keeps its turns and writes each once when the
    server is promoted."""
    primary = Server(tmp_path, "primary")
    primary.start()
    replica = Server(tmp_path, "replica")
    replica.args += ["--replicaof", "127.0.0.1", str(primary.port)]
    replica.start()
    try:
        store = await open_store(
            StoreConfig(backend="redis", url=replica.url, prefix="ro:")  # type: ignore[arg-type]
        )
        writer = Writer(store)
        writer.start()
        for n in range(6):
            writer.submit(turn("s", f"t{n}"))
        await asyncio.sleep(0.5)
        assert writer.unwritten == 6  # refused (READONLY), kept
        admin(replica.port).execute_command("REPLICAOF", "NO", "ONE")
        await writer.flush(5, outage=True)
        assert writer.unwritten == 0
        session = await store.get_session("k", "s")
        assert session is not None
        assert [t["messages"][0]["content"] for t in session.turns or []] == [
            f"t{n}" for n in range(6)
        ]
        await writer.stop()
        await store.close()
    finally:
        replica.stop()
        primary.stop()
