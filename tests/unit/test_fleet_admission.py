"""The admission queue: who gets a freed slot, and what a waiter sees when the queue
is full, when its wait runs out, and when it leaves."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from proxy.config import QueueConfig, UpstreamConfig
from proxy.errors import ProxyError
from proxy.fleet.admission import Admission
from proxy.routing import Replica, Upstream


def fleet(replicas: int = 2, max_in_flight: int = 1) -> Upstream:
    up = Upstream(
        UpstreamConfig.model_validate(
            {
                "name": "fleet",
                "replicas": [f"http://127.0.0.1:{9000 + i}/v1" for i in range(replicas)],
                "max_in_flight": max_in_flight,
                "balance": "least_busy",
            }
        )
    )
    for r in up.replicas:
        r.in_flight = max_in_flight  # every replica full
    return up


def free_one(adm: Admission, up: Upstream, replica: Replica) -> None:
    replica.in_flight -= 1
    adm.released(up)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_freed_slot_goes_to_a_waiter_with_its_replica_reserved() -> None:
    up = fleet()
    adm = Admission(QueueConfig())
    task = asyncio.create_task(adm.wait([up], None, "k", 0, 1.0))
    await settle()
    assert adm.waiting == 1 and not task.done()
    free_one(adm, up, up.replicas[1])
    got_up, replica = await asyncio.wait_for(task, 1)
    assert got_up is up and replica is up.replicas[1]
    assert replica.in_flight == 1  # reserved for the waiter
    assert adm.waiting == 0


async def test_higher_priority_first_then_fair_between_keys() -> None:
    up = fleet()
    adm = Admission(QueueConfig())
    order: list[str] = []

    async def one(key: str, priority: int) -> None:
        _, replica = await adm.wait([up], None, key, priority, 1.0)
        order.append(key)
        free_one(adm, up, replica)

    # heavy queues ten, light one, then a priority key arrives last
    tasks = [asyncio.create_task(one("heavy", 0)) for _ in range(10)]
    await settle()
    tasks.append(asyncio.create_task(one("light", 0)))
    tasks.append(asyncio.create_task(one("urgent", 5)))
    await settle()
    free_one(adm, up, up.replicas[0])
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert order[0] == "urgent"
    # light arrived after ten of heavy's, and is served second of the normal ones
    assert order.index("light") <= 2, order


async def test_weights_share_the_slots_in_proportion() -> None:
    up = fleet()
    adm = Admission(QueueConfig(max_waiting=10000))
    served: Counter[str] = Counter()
    enough = asyncio.Event()

    async def backlog(key: str, weight: float) -> None:
        while True:
            _, replica = await adm.wait([up], None, key, 0, weight)
            served[key] += 1
            if sum(served.values()) >= 800:
                enough.set()
            replica.in_flight -= 1
            await asyncio.sleep(0)
            adm.released(up)

    # each key keeps five waiting at all times
    tasks = [asyncio.create_task(backlog("a", 3.0)) for _ in range(5)]
    tasks += [asyncio.create_task(backlog("b", 1.0)) for _ in range(5)]
    await settle()
    free_one(adm, up, up.replicas[0])
    await asyncio.wait_for(enough.wait(), 5)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    ratio = served["a"] / served["b"]
    assert 2.6 < ratio < 3.4, served


async def test_a_full_queue_refuses_with_429_and_retry_after() -> None:
    up = fleet()
    adm = Admission(QueueConfig(max_waiting=1))
    first = asyncio.create_task(adm.wait([up], None, "k", 0, 1.0))
    await settle()
    with pytest.raises(ProxyError) as refused:
        await adm.wait([up], None, "k", 0, 1.0)
    assert refused.value.status == 429 and refused.value.code == "queue_full"
    assert refused.value.headers["Retry-After"] == "1"
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert adm.waiting == 0


async def test_a_wait_past_max_wait_seconds_is_a_503_and_leaves_the_queue() -> None:
    up = fleet()
    adm = Admission(QueueConfig(max_wait_seconds=0.05))
    with pytest.raises(ProxyError) as refused:
        await adm.wait([up], None, "k", 0, 1.0)
    assert refused.value.status == 503 and refused.value.code == "queue_timeout"
    assert int(refused.value.headers["Retry-After"]) >= 1
    assert adm.waiting == 0
    # a slot freed later goes nowhere and stays free
    free_one(adm, up, up.replicas[0])
    assert up.replicas[0].in_flight == 0


async def test_a_waiter_that_leaves_is_gone_and_the_slot_goes_to_the_next() -> None:
    up = fleet()
    adm = Admission(QueueConfig())
    leaving = asyncio.create_task(adm.wait([up], None, "a", 0, 1.0))
    await settle()
    staying = asyncio.create_task(adm.wait([up], None, "b", 0, 1.0))
    await settle()
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    assert adm.waiting == 1
    free_one(adm, up, up.replicas[0])
    _, replica = await asyncio.wait_for(staying, 1)
    assert replica is up.replicas[0] and replica.in_flight == 1


async def test_a_slot_handed_to_a_waiter_whose_client_left_goes_on_to_the_next() -> None:
    up = fleet()
    adm = Admission(QueueConfig())
    leaving = asyncio.create_task(adm.wait([up], None, "a", 0, 1.0))
    await settle()
    staying = asyncio.create_task(adm.wait([up], None, "b", 0, 1.0))
    await settle()
    # the slot is handed over, and the client leaves before its task runs again
    free_one(adm, up, up.replicas[0])
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    _, replica = await asyncio.wait_for(staying, 1)
    assert replica is up.replicas[0] and replica.in_flight == 1
    assert adm.waiting == 0


async def test_a_waiter_of_another_upstream_is_passed_over() -> None:
    up, other = fleet(), fleet()
    adm = Admission(QueueConfig())
    elsewhere = asyncio.create_task(adm.wait([other], None, "a", 0, 1.0))
    await settle()
    mine = asyncio.create_task(adm.wait([up], None, "b", 0, 1.0))
    await settle()
    free_one(adm, up, up.replicas[0])
    got, _ = await asyncio.wait_for(mine, 1)
    assert got is up and not elsewhere.done()
    elsewhere.cancel()
    await asyncio.gather(elsewhere, return_exceptions=True)


async def test_a_flooding_key_cannot_take_every_place_from_another() -> None:
    up = fleet()
    adm = Admission(QueueConfig(max_waiting=4))
    heavy = [asyncio.create_task(adm.wait([up], None, "heavy", 0, 1.0)) for _ in range(4)]
    await settle()
    # the queue is full of heavy's: light's arrival pushes out heavy's newest
    light = asyncio.create_task(adm.wait([up], None, "light", 0, 1.0))
    await settle()
    assert adm.waiting == 4
    pushed = heavy[-1]
    assert pushed.done()
    exc = pushed.exception()
    assert isinstance(exc, ProxyError) and exc.status == 429 and exc.code == "queue_full"
    # heavy arriving again is refused: it holds more places than light
    with pytest.raises(ProxyError) as refused:
        await adm.wait([up], None, "heavy", 0, 1.0)
    assert refused.value.status == 429
    # a second light arrival still finds a place (heavy holds 3, light would hold 2)
    light2 = asyncio.create_task(adm.wait([up], None, "light", 0, 1.0))
    await settle()
    assert not light2.done() and sum(t.done() for t in heavy) == 2
    # and light's first goes with heavy's first (both start at the same virtual time)
    free_one(adm, up, up.replicas[0])
    free_one(adm, up, up.replicas[1])
    await asyncio.wait_for(light, 1)
    assert heavy[0].done() and not heavy[1].done()
    for t in [*heavy, light2]:
        t.cancel()
    await asyncio.gather(*heavy, light2, return_exceptions=True)
    assert adm.waiting == 0


async def test_a_higher_priority_arrival_pushes_out_a_lower_one() -> None:
    up = fleet()
    adm = Admission(QueueConfig(max_waiting=2))
    low = [asyncio.create_task(adm.wait([up], None, f"low{i}", 0, 1.0)) for i in range(2)]
    await settle()
    high = asyncio.create_task(adm.wait([up], None, "high", 3, 1.0))
    await settle()
    assert not high.done() and sum(t.done() for t in low) == 1
    for t in [*low, high]:
        t.cancel()
    await asyncio.gather(*low, high, return_exceptions=True)
