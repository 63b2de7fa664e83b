"""Fleets of replicas, as a client and an operator see them: which stand-in backend
receives each request (x-upstream-replica), affinity of conversations and sessions,
a replica that goes down and comes back, bounded load, the same mapping in two proxy
processes, least_busy and round_robin, the engines' own load, and /readyz and
/metrics."""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.fixtures import ProxyFactory, metric
from tests.fixtures.fleet import (
    ProxyProcess,
    StandIn,
    body,
    fleet_config,
    grew,
    metrics_text,
    readyz,
    served_by,
    unique,
    user,
    vllm_metrics,
    wait_count,
    wait_until,
)

Client = TestClient[Any, Any]
MakeReplicas = Callable[..., Awaitable[list[StandIn]]]
SYSTEM = {"role": "system", "content": "You are a terse assistant."}
RETRY = {"attempts": 3, "backoff_initial": 0.01, "backoff_max": 0.02}


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


async def chat(
    client: Client, messages: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> tuple[str, dict[str, Any]]:
    """POST a chat request that must succeed: the stand-in that answered, and the
    response body; x-upstream-replica must name that same stand-in."""
    resp = await client.post("/v1/chat/completions", json=body(messages), headers=headers or {})
    doc: dict[str, Any] = await resp.json()
    assert resp.status == 200, doc
    who = served_by(doc)
    assert resp.headers["x-upstream-replica"] == who.removeprefix("b"), (who, resp.headers)
    return who, doc


def assistant(doc: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = doc["choices"][0]["message"]
    return message


# -- replicas: the header, /readyz, /metrics --


async def test_x_upstream_replica_is_the_index_of_the_backend_that_got_the_request(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(3)
    name = unique()
    client = await make_proxy(fleet_config(name, [s.url for s in b], balance="round_robin"))
    indices = []
    for i in range(9):
        text = f"request {i}"
        resp = await client.post("/v1/chat/completions", json=body([user(text)]))
        assert resp.status == 200
        doc = await resp.json()
        assert resp.headers["x-upstream"] == name
        index = int(resp.headers["x-upstream-replica"])
        indices.append(index)
        assert served_by(doc) == f"b{index}"
        # that stand-in received it, and no other did
        assert [s.saw(text) for s in b] == [j == index for j in range(3)]
    assert set(indices) == {0, 1, 2}
    assert [len(s.received) for s in b] == [3, 3, 3]


async def test_readyz_and_metrics_show_replicas_by_index_with_their_in_flight(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(3, hold=True)
    await b[2].stop()  # refuses connections from the start
    name = unique()
    client = await make_proxy(fleet_config(name, [s.url for s in b], balance="round_robin"))
    # round_robin: the first request goes to replica 0, and is held there
    task = asyncio.create_task(client.post("/v1/chat/completions", json=body([user("held")])))
    await wait_until(lambda: b[0].held == 1, what="replica 0 holding the request")

    resp = await client.get("/readyz")
    text = await resp.text()
    doc = await resp.json()
    rows = doc["replicas"][name]
    assert [(r["index"], r["state"], r["in_flight"]) for r in rows] == [
        (0, "ok", 1),
        (1, "ok", 0),
        (2, "unreachable", 0),
    ]
    assert doc["queue"] == {"waiting": 0}
    # never a replica's address or port
    assert "127.0.0.1" not in text
    for s in b:
        assert f":{s.port}" not in text

    scrape = await metrics_text(client)
    gauge = "chat_proxy_replica_in_flight"
    assert metric(scrape, gauge, upstream=name, replica="0") == 1
    assert metric(scrape, gauge, upstream=name, replica="1") == 0
    assert f'{gauge}{{replica="0",upstream="{name}"}} 1.0' in scrape
    # (a bare port number may be part of a histogram's sum: the address is what counts)
    assert "127.0.0.1" not in scrape and f":{b[0].port}" not in scrape

    b[0].release()
    resp = await task
    assert resp.status == 200
    assert resp.headers["x-upstream-replica"] == "0"
    rows = (await readyz(client))["replicas"][name]
    assert [r["in_flight"] for r in rows] == [0, 0, 0]
    scrape = await metrics_text(client)
    assert metric(scrape, gauge, upstream=name) == 0


async def test_a_failed_attempt_is_counted_per_replica_and_retried_on_another(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(3)
    await b[1].stop()
    name = unique()
    client = await make_proxy(
        fleet_config(name, [s.url for s in b], balance="round_robin", retries=RETRY)
    )
    before = await metrics_text(client)
    statuses = []
    for i in range(3):
        resp = await client.post("/v1/chat/completions", json=body([user(f"r{i}")]))
        statuses.append(resp.status)
        doc = await resp.json()
        assert served_by(doc) in ("b0", "b2")
        if i == 1:  # round_robin's turn of replica 1: refused, then served by another
            assert resp.headers["x-upstream-attempts"] == "2"
            assert resp.headers["x-upstream-replica"] != "1"
    assert statuses == [200, 200, 200]
    after = await metrics_text(client)
    errors = "chat_proxy_replica_errors_total"
    assert grew(before, after, errors, upstream=name, replica="1", kind="connect") == 1
    assert metric(after, errors, upstream=name, replica="0") == 0
    assert metric(after, errors, upstream=name, replica="2") == 0


# -- affinity --


async def test_each_conversation_stays_on_one_replica_and_they_spread(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(3)
    client = await make_proxy(fleet_config(unique(), [s.url for s in b]))
    histories: list[list[dict[str, Any]]] = [[SYSTEM] for _ in range(40)]
    served: dict[int, list[str]] = {c: [] for c in range(40)}
    for turn in range(4):
        for c, history in enumerate(histories):
            text = f"conversation {c}, turn {turn}"
            history.append(user(text))
            who, doc = await chat(client, history)
            assert b[int(who[1:])].saw(text)
            served[c].append(who)
            history.append(assistant(doc))
    for c, whos in served.items():
        assert len(set(whos)) == 1, (c, whos)
    homes = Counter(whos[0] for whos in served.values())
    assert set(homes) == {"b0", "b1", "b2"}, homes
    assert min(homes.values()) >= 3, homes
    # every turn of a conversation reached its home and nowhere else
    assert sum(len(s.received) for s in b) == 160


async def test_a_session_named_by_header_stays_on_one_replica(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(3)
    client = await make_proxy(
        fleet_config(unique(), [s.url for s in b], middleware=[{"type": "session"}])
    )
    by_session: dict[int, set[str]] = {}
    by_message: dict[int, set[str]] = {}
    for s in range(20):
        for i in range(3):
            # a different opening message each time: only the header ties them
            text = f"session {s}, unrelated question {i}"
            who, _ = await chat(client, [user(text)], headers={"X-Session-Id": f"call-{s}"})
            by_session.setdefault(s, set()).add(who)
            who, _ = await chat(client, [user(text)])  # the same, with no session named
            by_message.setdefault(s, set()).add(who)
    assert all(len(whos) == 1 for whos in by_session.values()), by_session
    assert len({next(iter(whos)) for whos in by_session.values()}) == 3
    # without the header the same requests scatter: the header is what held them
    assert any(len(whos) > 1 for whos in by_message.values())


@pytest.mark.parametrize("sessions", [False, True], ids=["no-session-middleware", "sessions"])
async def test_an_elevenlabs_conversation_id_stays_on_one_replica(
    make_proxy: ProxyFactory, replicas: MakeReplicas, sessions: bool
) -> None:
    b = await replicas(3)
    middleware = [{"type": "session"}] if sessions else []
    client = await make_proxy(fleet_config(unique(), [s.url for s in b], middleware=middleware))
    by_conversation: dict[int, set[str]] = {}
    for c in range(20):
        for i in range(3):
            resp = await client.post(
                "/v1/chat/completions",
                json=body(
                    [user(f"call {c}, caller says {i}")],
                    elevenlabs_extra_body={"conversation_id": f"conv_{c}"},
                ),
            )
            doc = await resp.json()
            assert resp.status == 200, doc
            who = served_by(doc)
            assert resp.headers["x-upstream-replica"] == who[1:]
            by_conversation.setdefault(c, set()).add(who)
    assert all(len(whos) == 1 for whos in by_conversation.values()), by_conversation
    assert len({next(iter(whos)) for whos in by_conversation.values()}) == 3
    for s in b:
        assert all("elevenlabs_extra_body" not in r.body for r in s.received)


async def test_a_continued_session_with_a_trimmed_history_stays_on_one_replica(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(3)
    client = await make_proxy(
        fleet_config(unique(), [s.url for s in b], middleware=[{"type": "session"}])
    )
    moved = []
    for c in range(12):
        full: list[dict[str, Any]] = []
        sessions = set()
        whos = set()
        for turn in range(6):
            full.append(user(f"conversation {c}, message {turn}"))
            sent = [SYSTEM, *full[-3:]]  # the system prompt and the last three messages
            resp = await client.post("/v1/chat/completions", json=body(sent))
            doc = await resp.json()
            assert resp.status == 200, doc
            sessions.add(resp.headers["X-Session-Id"])
            whos.add(served_by(doc))
            full.append(assistant(doc))
        assert len(sessions) == 1  # the proxy continued one session throughout
        if len(whos) > 1:
            moved.append((c, sorted(whos)))
    assert moved == []


# -- a replica down and back --


async def test_a_replica_down_moves_only_its_conversations_and_they_come_back(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(3)
    client = await make_proxy(
        fleet_config(
            unique(),
            [s.url for s in b],
            retries=RETRY,
            circuit={"failures": 1, "cooldown": 0.2},
        )
    )
    histories: list[list[dict[str, Any]]] = [[SYSTEM] for _ in range(30)]
    turns = [0] * 30

    async def turn(c: int) -> str:
        text = f"conversation {c}, turn {turns[c]}"
        turns[c] += 1
        histories[c].append(user(text))
        who, doc = await chat(client, histories[c])
        assert b[int(who[1:])].saw(text)
        histories[c].append(assistant(doc))
        return who

    home = {c: await turn(c) for c in range(30)}
    counts = Counter(home.values())
    down = counts.most_common(1)[0][0]
    assert counts[down] >= 2
    mine = [c for c in range(30) if home[c] == down]
    others = [c for c in range(30) if home[c] != down]

    await b[int(down[1:])].stop()
    moved: dict[int, str] = {}
    for _ in range(2):
        for c in range(30):
            who = await turn(c)  # every request succeeds (chat() checks the status)
            if c in mine:
                assert who != down
                assert moved.setdefault(c, who) == who  # and stays where it moved
            else:
                assert who == home[c]  # the other conversations do not move at all

    await b[int(down[1:])].start()  # the same port again
    await asyncio.sleep(0.3)  # past the circuit's cooldown
    for c in range(30):
        assert await turn(c) == home[c]
    assert others  # some conversations never moved


async def test_a_refused_connection_goes_to_another_replica_with_one_attempt(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(3)
    await b[0].stop()
    # the default single attempt, and a circuit that stays closed: the refused
    # requests are not kept from replica 0, each is refused there and moves on
    client = await make_proxy(
        fleet_config(unique(), [s.url for s in b], circuit={"failures": 100, "cooldown": 30})
    )
    refused: dict[int, str] = {}
    for turn in range(2):
        for c in range(20):
            messages = [SYSTEM, user(f"conversation {c}"), user(f"turn {turn}")]
            resp = await client.post("/v1/chat/completions", json=body(messages))
            doc = await resp.json()
            assert resp.status == 200, doc
            who = served_by(doc)
            assert who != "b0"
            if resp.headers.get("x-upstream-attempts") == "2":
                # refused by its own replica: its next one on the ring, every time
                assert refused.setdefault(c, who) == who
    assert len(refused) >= 2


# -- bounded load --


async def burst(client: Client, b: list[StandIn], n: int) -> tuple[str, int, list[str]]:
    """One conversation's home (found by a first request alone), then `n` of its
    requests at once, held until all have arrived: the home, how many of them it
    held, and who answered each."""
    messages = [SYSTEM, user("one busy conversation")]
    home, _ = await chat(client, messages)
    for s in b:
        s.hold = True
    tasks = [
        asyncio.create_task(client.post("/v1/chat/completions", json=body(messages)))
        for _ in range(n)
    ]
    await wait_count(lambda: sum(s.held for s in b), n, what="requests held")
    at_home = b[int(home[1:])].held
    for s in b:
        s.let_go()
    whos = []
    for t in tasks:
        resp = await t
        assert resp.status == 200
        whos.append(served_by(await resp.json()))
    return home, at_home, whos


async def test_concurrent_requests_beyond_the_bound_go_elsewhere(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(2)
    client = await make_proxy(
        fleet_config(unique(), [s.url for s in b], affinity={"load_factor": 1.25})
    )
    n = 8
    home, at_home, whos = await burst(client, b, n)
    elsewhere = n - at_home
    assert Counter(whos) == {home: at_home, ("b1" if home == "b0" else "b0"): elsewhere}
    # the home replica never holds more than load_factor x the mean load
    assert at_home <= math.ceil(1.25 * n / 2)
    assert elsewhere >= 1
    assert at_home > elsewhere  # only the excess left
    for _ in range(5):  # one at a time: home every time
        assert (await chat(client, [SYSTEM, user("one busy conversation")]))[0] == home


async def test_spills_are_counted_in_the_metrics(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(2)
    name = unique()
    client = await make_proxy(
        fleet_config(name, [s.url for s in b], affinity={"load_factor": 1.25})
    )
    n = 8
    home, at_home, _ = await burst(client, b, n)
    assert n - at_home >= 1
    scrape = await metrics_text(client)
    # counted against the replica they were meant for
    spills = metric(scrape, "chat_proxy_affinity_spills_total", upstream=name, replica=home[1:])
    assert spills == n - at_home


# -- the same mapping in two proxy processes --


async def test_two_proxy_processes_map_conversations_alike_whatever_the_replica_order(
    tmp_path: Path, replicas: MakeReplicas
) -> None:
    b = await replicas(3)
    urls = [s.url for s in b]
    orders = [urls, [urls[2], urls[0], urls[1]]]
    procs = []
    for i, order in enumerate(orders):
        cfg = tmp_path / f"proxy{i}.yaml"
        cfg.write_text(fleet_config("fleet", order))
        procs.append(ProxyProcess(cfg, tmp_path / f"proxy{i}.log"))
    try:
        for p in procs:
            await p.start()
        for p in procs:
            await p.wait_up()
        async with aiohttp.ClientSession() as session:

            async def send(p: ProxyProcess, messages: list[dict[str, Any]]) -> tuple[str, str]:
                async with session.post(
                    f"{p.url}/v1/chat/completions", json=body(messages)
                ) as resp:
                    doc = await resp.json()
                    assert resp.status == 200, doc
                    return served_by(doc), resp.headers["x-upstream-replica"]

            homes: dict[int, str] = {}
            for c in range(30):
                history: list[dict[str, Any]] = [SYSTEM]
                whos = []
                for turn in range(4):
                    history.append(user(f"conversation {c}, turn {turn}"))
                    proxy = procs[(c + turn) % 2]  # alternately through one and the other
                    who, index = await send(proxy, history)
                    # each proxy names the replica by its own list's index
                    own = orders[procs.index(proxy)]
                    assert own[int(index)] == b[int(who[1:])].url
                    whos.append(who)
                    history.append({"role": "assistant", "content": f"from {who}"})
                assert len(set(whos)) == 1, (c, whos)
                homes[c] = whos[0]

            # a conversation the client names (ElevenLabs): alike through either
            named: dict[int, set[str]] = {}
            for c in range(10):
                for p in procs:
                    messages = [user(f"call {c} through {p.port}")]
                    extra = {"elevenlabs_extra_body": {"conversation_id": f"conv_{c}"}}
                    async with session.post(
                        f"{p.url}/v1/chat/completions", json=body(messages, **extra)
                    ) as resp:
                        assert resp.status == 200
                        named.setdefault(c, set()).add(served_by(await resp.json()))
        assert len(set(homes.values())) >= 2
        assert all(len(whos) == 1 for whos in named.values()), named
    finally:
        for p in procs:
            await p.stop()


# -- least_busy and round_robin --


async def test_least_busy_sends_new_requests_to_the_replica_with_fewer_in_flight(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(3, hold=True)
    client = await make_proxy(fleet_config(unique(), [s.url for s in b], balance="least_busy"))
    tasks = []
    for i in range(6):
        tasks.append(
            asyncio.create_task(client.post("/v1/chat/completions", json=body([user(f"held {i}")])))
        )
        await wait_count(lambda: sum(s.held for s in b), i + 1, what="requests held")
        counts = [s.held for s in b]
        assert max(counts) - min(counts) <= 1, counts  # each went to a least busy one
    assert [s.held for s in b] == [2, 2, 2]
    b[1].release()
    await wait_until(lambda: b[1].active == 0, what="replica 1 idle")
    for i in range(2):  # replica 1 is the least busy now, then still (1 < 2)
        tasks.append(
            asyncio.create_task(client.post("/v1/chat/completions", json=body([user(f"new {i}")])))
        )
        await wait_count(lambda: b[1].held, i + 1, what="requests held on replica 1")
    assert [s.held for s in b] == [2, 2, 2]
    for s in b:
        s.release()
    for t in tasks:
        assert (await t).status == 200


async def test_round_robin_takes_the_replicas_in_turn(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(3)
    client = await make_proxy(fleet_config(unique(), [s.url for s in b], balance="round_robin"))
    indices = []
    for _ in range(6):
        # the same conversation every time: round_robin does not care
        resp = await client.post("/v1/chat/completions", json=body([SYSTEM, user("same")]))
        assert resp.status == 200
        indices.append(resp.headers["x-upstream-replica"])
    assert indices == ["0", "1", "2", "0", "1", "2"]
    assert [len(s.received) for s in b] == [2, 2, 2]


# -- the engines' own load --


async def test_least_busy_reads_the_engines_load_from_their_metrics(
    make_proxy: ProxyFactory, replicas: MakeReplicas
) -> None:
    b = await replicas(2)
    b[0].metrics_text = vllm_metrics(running=4, waiting=50)
    b[1].metrics_text = vllm_metrics(running=0, waiting=0)
    name = unique()
    client = await make_proxy(
        fleet_config(
            name,
            [s.url for s in b],
            balance="least_busy",
            load={"metrics": "vllm", "interval": 0.1},
        )
    )

    async def engines_say(waiting: list[float]) -> None:
        for _ in range(300):
            rows = (await readyz(client))["replicas"][name]
            if [r.get("engine", {}).get("waiting") for r in rows] == waiting:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"the engines' load was not read: {rows}")

    await engines_say([50, 0])
    for i in range(8):
        assert (await chat(client, [user(f"q{i}")]))[0] == "b1"
    # the engines' load changes: so does the choice
    b[0].metrics_text = vllm_metrics(running=0, waiting=0)
    b[1].metrics_text = vllm_metrics(running=4, waiting=50)
    await engines_say([0, 50])
    for i in range(8):
        assert (await chat(client, [user(f"r{i}")]))[0] == "b0"
    assert all(s.metrics_hits >= 2 for s in b)


async def test_a_replica_whose_metrics_fail_still_serves_with_one_warning(
    make_proxy: ProxyFactory, replicas: MakeReplicas, caplog: pytest.LogCaptureFixture
) -> None:
    b = await replicas(2)
    b[0].metrics_text = vllm_metrics(running=5, waiting=0)
    b[1].metrics_status = 500
    b[1].metrics_text = "Internal Server Error"
    caplog.set_level(logging.INFO, logger="chat_proxy.fleet")
    client = await make_proxy(
        fleet_config(
            unique(),
            [s.url for s in b],
            balance="least_busy",
            load={"metrics": "vllm", "interval": 0.1},
        )
    )
    await wait_until(lambda: b[1].metrics_hits >= 5, what="five rounds of polling")
    # replica 1's load is its in-flight count (0), replica 0's engine says 5: all to 1
    for i in range(6):
        assert (await chat(client, [user(f"q{i}")]))[0] == "b1"
    warnings = [
        r for r in caplog.records if r.name == "chat_proxy.fleet" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert getattr(warnings[0], "replica", None) == 1
    assert str(b[1].port) not in warnings[0].getMessage()
