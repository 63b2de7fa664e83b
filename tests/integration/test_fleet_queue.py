"""The admission queue of a fleet (`max_in_flight` per replica, `queue`), as clients
see it: a request beyond the replicas' slots waits and is then served (x-queue-ms),
429 when the queue is full, 503 past max_wait_seconds, a client that leaves while
waiting, priorities, and fair shares between keys."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy import jsonfast
from tests.fixtures import ProxyFactory, metric
from tests.fixtures.fleet import (
    StandIn,
    body,
    fleet_config,
    grew,
    metrics_text,
    readyz,
    served_by,
    unique,
    user,
    wait_count,
    wait_for_waiting,
    wait_until,
)

Client = TestClient[Any, Any]
MakeReplicas = Callable[..., Awaitable[list[StandIn]]]
SERVICE = 0.02  # seconds a stand-in takes per request in the fairness tests


@pytest.fixture
async def replicas() -> AsyncIterator[MakeReplicas]:
    """replicas(n, **settings) -> n started stand-ins, named b0, b1... in order."""
    made: list[StandIn] = []

    async def make(n: int, **settings: Any) -> list[StandIn]:
        new = [StandIn(f"b{len(made) + i}", **settings) for i in range(n)]
        for stand_in in new:
            await stand_in.start()
        made.extend(new)
        return new

    yield make
    for stand_in in made:
        await stand_in.stop()


def post(client: Client, text: str, key: str | None = None) -> asyncio.Task[Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return asyncio.create_task(
        client.post("/v1/chat/completions", json=body([user(text)]), headers=headers)
    )


async def fill(client: Client, b: list[StandIn], key: str | None = None) -> list[asyncio.Task[Any]]:
    """One held request on each replica (max_in_flight 1): every slot taken."""
    tasks = [post(client, f"filler {i}", key) for i in range(len(b))]
    await wait_until(lambda: all(s.held == 1 for s in b), what="a request held on each replica")
    return tasks


async def all_ok(tasks: list[asyncio.Task[Any]]) -> None:
    statuses = [(await t).status for t in tasks]
    assert statuses == [200] * len(tasks), statuses


def nobody_saw(b: list[StandIn], text: str) -> bool:
    return not any(s.saw(text) for s in b)


def keys(*entries: tuple[str, int, float]) -> dict[str, Any]:
    """The auth middleware with keys `sk-test-ID`, each (id, priority, weight)."""
    return {
        "type": "auth",
        "keys": [
            {"id": i, "key": f"sk-test-{i}", "priority": p, "weight": w} for i, p, w in entries
        ],
    }


# -- waiting, and refusals --


async def test_a_request_beyond_every_slot_waits_and_is_served_when_one_frees(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(2, hold=True)
    name = unique()
    client = await make_proxy(fleet_config(name, [s.url for s in b], max_in_flight=1))
    before = await metrics_text(client)
    fillers = await fill(client, b)
    third = post(client, "third")
    await wait_for_waiting(client, 1)
    scrape = await metrics_text(client)
    assert metric(scrape, "chat_proxy_queue_waiting", upstream=name) == 1
    await asyncio.sleep(0.05)
    assert nobody_saw(b, "third")  # it waits in the proxy, not at a backend
    assert [s.held for s in b] == [1, 1]

    b[0].release()  # replica 0's slot frees: the waiter takes it
    await wait_until(lambda: b[0].saw("third"), what="the waiter on replica 0")
    assert not b[1].saw("third")
    for s in b:
        s.let_go()
    for t in fillers:
        resp = await t
        assert resp.status == 200
        assert resp.headers["x-queue-ms"] == "0"
    resp = await third
    assert resp.status == 200
    assert served_by(await resp.json()) == "b0"
    assert resp.headers["x-upstream-replica"] == "0"
    assert int(resp.headers["x-queue-ms"]) >= 50

    after = await metrics_text(client)
    count = "chat_proxy_queue_wait_seconds_count"
    total = "chat_proxy_queue_wait_seconds_sum"
    assert grew(before, after, count, upstream=name) == 3
    assert grew(before, after, total, upstream=name) >= 0.05
    # the waiter's wait is in a bucket above 25 ms, the two others' at 0
    bucket = "chat_proxy_queue_wait_seconds_bucket"
    assert metric(after, bucket, upstream=name, le="0.0") == 2
    assert metric(after, bucket, upstream=name, le="0.025") == 2
    assert metric(after, "chat_proxy_queue_waiting", upstream=name) == 0
    assert (await readyz(client))["queue"] == {"waiting": 0}


async def test_a_full_queue_refuses_with_429_and_retry_after(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(2, hold=True)
    client = await make_proxy(
        fleet_config(unique(), [s.url for s in b], max_in_flight=1, queue={"max_waiting": 1})
    )
    before = await metrics_text(client)
    fillers = await fill(client, b)
    waiter = post(client, "waits")
    await wait_for_waiting(client, 1)
    started = time.monotonic()
    resp = await client.post("/v1/chat/completions", json=body([user("one too many")]))
    assert time.monotonic() - started < 1.0  # refused at once, not after a wait
    assert resp.status == 429
    doc = await resp.json()
    assert set(doc) == {"error"}
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    assert doc["error"]["type"] == "rate_limit_error"
    assert doc["error"]["code"] == "queue_full"
    assert int(resp.headers["Retry-After"]) >= 1

    for s in b:
        s.let_go()
    await all_ok([*fillers, waiter])
    assert nobody_saw(b, "one too many")
    assert b[0].saw("waits") or b[1].saw("waits")
    after = await metrics_text(client)
    assert grew(before, after, "chat_proxy_queue_refusals_total", reason="queue_full") == 1


async def test_a_full_queue_says_when_to_come_back_in_milliseconds_too(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(2, hold=True)
    client = await make_proxy(
        fleet_config(unique(), [s.url for s in b], max_in_flight=1, queue={"max_waiting": 0})
    )
    fillers = await fill(client, b)
    resp = await client.post("/v1/chat/completions", json=body([user("one too many")]))
    for s in b:
        s.let_go()
    await all_ok(fillers)
    assert resp.status == 429
    assert (await resp.json())["error"]["code"] == "queue_full"
    assert int(resp.headers["retry-after-ms"]) >= 1


async def test_a_wait_past_max_wait_seconds_ends_in_503_with_retry_after(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(2, hold=True)
    client = await make_proxy(
        fleet_config(unique(), [s.url for s in b], max_in_flight=1, queue={"max_wait_seconds": 0.3})
    )
    before = await metrics_text(client)
    fillers = await fill(client, b)
    started = time.monotonic()
    resp = await client.post("/v1/chat/completions", json=body([user("too patient")]))
    waited = time.monotonic() - started
    assert 0.28 <= waited < 2.0
    assert resp.status == 503
    doc = await resp.json()
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    assert doc["error"]["type"] == "api_error"
    assert doc["error"]["code"] == "queue_timeout"
    assert int(resp.headers["Retry-After"]) >= 1
    assert (await readyz(client))["queue"] == {"waiting": 0}

    for s in b:
        s.let_go()
    await all_ok(fillers)
    assert nobody_saw(b, "too patient")
    after = await metrics_text(client)
    assert grew(before, after, "chat_proxy_queue_refusals_total", reason="queue_timeout") == 1


async def test_a_client_that_leaves_while_waiting_leaves_the_queue_at_once(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(2, hold=True)
    name = unique()
    client = await make_proxy(fleet_config(name, [s.url for s in b], max_in_flight=1))
    before = await metrics_text(client)
    fillers = await fill(client, b)

    # a client on a socket of its own, so that closing it is a disconnect
    payload = jsonfast.dumps(body([user("gone")]))
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    await wait_for_waiting(client, 1)
    patient = post(client, "patient")
    await wait_for_waiting(client, 2)

    writer.close()
    await writer.wait_closed()
    started = time.monotonic()
    await wait_for_waiting(client, 1, timeout=1.0)  # the one that left, at once
    assert time.monotonic() - started < 0.5
    scrape = await metrics_text(client)
    assert metric(scrape, "chat_proxy_queue_waiting", upstream=name) == 1

    b[1].release()  # the freed slot goes to the next waiter
    await wait_until(lambda: b[1].saw("patient"), what="the next waiter on replica 1")
    await wait_for_waiting(client, 0)
    for s in b:
        s.let_go()
    resp = await patient
    assert resp.status == 200
    assert int(resp.headers["x-queue-ms"]) > 0
    await all_ok(fillers)
    assert nobody_saw(b, "gone")
    assert len(b[0].received) + len(b[1].received) == 3
    after = await metrics_text(client)
    assert grew(before, after, "chat_proxy_queue_refusals_total", reason="client_left") == 1
    rows = (await readyz(client))["replicas"][name]
    assert [r["in_flight"] for r in rows] == [0, 0]


# -- priority and fairness --


async def test_a_higher_priority_waiter_is_served_first(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(2, hold=True)
    client = await make_proxy(
        fleet_config(
            unique(),
            [s.url for s in b],
            max_in_flight=1,
            middleware=[keys(("low", 0, 1), ("high", 5, 1))],
        )
    )
    fillers = await fill(client, b, "sk-test-low")
    waiters = []
    for i in range(3):
        waiters.append(post(client, f"low {i}", "sk-test-low"))
        await wait_for_waiting(client, i + 1)
    waiters.append(post(client, "high", "sk-test-high"))
    await wait_for_waiting(client, 4)

    order: list[str] = []
    for n in range(4):
        # one slot frees at a time: the next to arrive at a backend is the next served
        next(s for s in b if s.held).release(1)
        await wait_count(lambda: sum(len(s.received) for s in b), len(b) + n + 1)
        order.append(max((r for s in b for r in s.received), key=lambda r: r.at).last_user)
        assert (await readyz(client))["queue"]["waiting"] == 3 - n
    assert order == ["high", "low 0", "low 1", "low 2"]
    for s in b:
        s.let_go()
    await all_ok([*fillers, *waiters])


class Driver:
    """Keeps `workers` requests of one key going, each sent again when answered, and
    records when each was answered and how long it waited for admission."""

    def __init__(self, client: Client, key: str, workers: int) -> None:
        self.client = client
        self.key = key
        self.answered: list[tuple[float, int]] = []  # (monotonic time, x-queue-ms)
        self.statuses: Counter[int] = Counter()
        self._stop = False
        self._tasks = [asyncio.create_task(self._work(i)) for i in range(workers)]

    async def _work(self, i: int) -> None:
        n = 0
        while not self._stop:
            resp = await self.client.post(
                "/v1/chat/completions",
                json=body([user(f"{self.key} {i} {n}")]),
                headers={"Authorization": f"Bearer sk-test-{self.key}"},
            )
            await resp.read()
            self.statuses[resp.status] += 1
            n += 1
            if resp.status != 200:
                await asyncio.sleep(0.005)  # refused: again shortly
                continue
            self.answered.append((time.monotonic(), int(resp.headers["x-queue-ms"])))

    def served_between(self, start: float, end: float) -> int:
        return sum(1 for at, _ in self.answered if start <= at < end)

    async def stop(self) -> None:
        self._stop = True
        await asyncio.wait_for(asyncio.gather(*self._tasks), 10)


async def test_a_light_key_is_served_promptly_behind_a_flooding_one(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(2, delay=SERVICE)
    client = await make_proxy(
        fleet_config(
            unique(),
            [s.url for s in b],
            max_in_flight=1,
            middleware=[keys(("heavy", 0, 1), ("light", 0, 1))],
        )
    )
    backlog = 40
    heavy = Driver(client, "heavy", backlog + 2)  # two in service, the rest waiting
    try:
        deadline = time.monotonic() + 5
        while (await readyz(client))["queue"]["waiting"] < backlog - 2:
            assert time.monotonic() < deadline, "heavy's backlog did not build up"
            await asyncio.sleep(0.01)
        light_waits: list[int] = []
        light_times: list[float] = []
        for i in range(15):  # one at a time, while heavy keeps its backlog
            started = time.monotonic()
            resp = await client.post(
                "/v1/chat/completions",
                json=body([user(f"light {i}")]),
                headers={"Authorization": "Bearer sk-test-light"},
            )
            assert resp.status == 200
            light_times.append(time.monotonic() - started)
            light_waits.append(int(resp.headers["x-queue-ms"]))
        waiting_at_end = (await readyz(client))["queue"]["waiting"]
    finally:
        await heavy.stop()
    assert waiting_at_end >= backlog - 5  # heavy was backlogged throughout
    assert set(heavy.statuses) == {200}
    service_ms = SERVICE * 1000
    # first in, first out, light would wait behind heavy's whole backlog on two replicas
    fifo_ms = (backlog - 2) / 2 * service_ms
    bound_ms = 5 * service_ms  # about one service time in theory: bounded generously
    assert fifo_ms >= 3.5 * bound_ms
    assert max(light_waits) < bound_ms, light_waits
    assert max(light_times) * 1000 < bound_ms + 3 * service_ms, light_times
    # while heavy's own requests did wait about as long as first in, first out says
    heavy_waits = [ms for _, ms in heavy.answered[backlog + 2 :]]
    assert statistics.median(heavy_waits) > 0.5 * fifo_ms


async def test_backlogged_keys_share_in_proportion_to_their_weights(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(2, delay=SERVICE)
    client = await make_proxy(
        fleet_config(
            unique(),
            [s.url for s in b],
            max_in_flight=1,
            middleware=[keys(("big", 0, 3), ("small", 0, 1))],
        )
    )
    big = Driver(client, "big", 20)
    small = Driver(client, "small", 20)
    try:
        await asyncio.sleep(0.4)  # both backlogged by now
        assert (await readyz(client))["queue"]["waiting"] >= 30
        start = time.monotonic()
        await asyncio.sleep(1.5)
        end = time.monotonic()
        assert (await readyz(client))["queue"]["waiting"] >= 30
    finally:
        await big.stop()
        await small.stop()
    served_big = big.served_between(start, end)
    served_small = small.served_between(start, end)
    assert served_big + served_small >= 40  # enough for the proportion to mean something
    assert 2.4 <= served_big / served_small <= 3.75, (served_big, served_small)


async def test_a_flooding_key_cannot_take_every_waiting_place_from_another(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(2, delay=SERVICE)
    client = await make_proxy(
        fleet_config(
            unique(),
            [s.url for s in b],
            max_in_flight=1,
            queue={"max_waiting": 4},
            middleware=[keys(("heavy", 0, 1), ("light", 0, 1))],
        )
    )
    heavy = Driver(client, "heavy", 12)  # more than the slots and the places together
    try:
        await wait_until(lambda: heavy.statuses[429] >= 5, what="heavy refused: the queue full")
        refused_before = heavy.statuses[429]
        light = []
        for i in range(10):  # one at a time, each finding the queue full of heavy's
            resp = await client.post(
                "/v1/chat/completions",
                json=body([user(f"light {i}")]),
                headers={"Authorization": "Bearer sk-test-light"},
            )
            light.append(resp.status)
        refused_meanwhile = heavy.statuses[429] - refused_before
    finally:
        await heavy.stop()
    assert light == [200] * 10
    assert refused_meanwhile >= 10  # heavy went on being turned away throughout
    assert heavy.statuses[200] > 0
