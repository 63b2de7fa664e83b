"""A fleet of two real llama.cpp servers behind one upstream (`replicas:`, `balance:
affinity`), driven by the OpenAI Python SDK, whose raw responses carry the proxy's
`x-upstream-replica` header.

- Every turn of a conversation (each resending the whole history) is answered by
  one replica, and conversations with different first messages spread over both.
- A streamed turn lands on the replica of the conversation's other turns.
- When the replica holding a conversation stops, the next turn is answered by the
  other one, and the turns after stay there: a connection refused never reached
  the backend, so the other replica takes it without spending a retry (with
  `retries` at their default or `attempts: 2`, and with the SDK's own retries).

No middleware names a session, so the affinity key is the leading messages (the
system prompt and the first user message). The ring is placed by the replicas'
URLs, whose ports are free ports of the run: no test assumes which replica a
conversation goes to, only that one conversation keeps to one.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import openai
import pytest

from tests.fixtures import ProxyFactory

if TYPE_CHECKING:
    from .llama_server import LlamaFleet

Client = Any  # aiohttp TestClient of the proxy
MAX_TOKENS = 4
CALL_TIMEOUT = 30.0  # seconds, around each SDK call (the SDK's own timeout is 20)
SYSTEM = "You are a terse assistant."
FOLLOW_UPS = ["Tell me more.", "Why is that?", "And then?", "Thanks, one last thing."]

FLEET = """
upstreams:
  - name: fleet
    replicas: ["{replica0}", "{replica1}"]
    balance: affinity
    circuit: {failures: 1, cooldown: 30}
    timeouts: {connect: 2, first_byte: 20, idle: 20}
"""


def sdk(client: Client, max_retries: int = 0) -> openai.AsyncOpenAI:
    """The SDK pointed at the proxy; by default without its own retries, which would
    hide the proxy's answer."""
    return openai.AsyncOpenAI(
        base_url=str(client.make_url("/v1")),
        api_key="sk-fleet-unused",
        max_retries=max_retries,
        timeout=20.0,
    )


class Conversation:
    """A chat whose every turn sends the whole history so far; `replicas` lists the
    replica (the `x-upstream-replica` header) that answered each turn."""

    def __init__(self, py: openai.AsyncOpenAI, model: str, opening: str) -> None:
        self.py = py
        self.model = model
        self.opening = opening
        self.messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
        self.replicas: list[str] = []

    def _next_user(self) -> str:
        turns = len(self.replicas)
        return self.opening if turns == 0 else FOLLOW_UPS[(turns - 1) % len(FOLLOW_UPS)]

    async def turn(self, *, stream: bool = False) -> str:
        """One more turn; returns the replica that answered it."""
        self.messages.append({"role": "user", "content": self._next_user()})
        async with asyncio.timeout(CALL_TIMEOUT):
            if stream:
                replica, content = await self._streamed()
            else:
                replica, content = await self._plain()
        assert content, f"empty reply from replica {replica}"
        self.messages.append({"role": "assistant", "content": content})
        self.replicas.append(replica)
        return replica

    async def _plain(self) -> tuple[str, str]:
        raw = await self.py.chat.completions.with_raw_response.create(
            model=self.model,
            messages=self.messages,  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        assert raw.status_code == 200
        assert raw.headers["x-upstream"] == "fleet"
        reply = raw.parse()
        assert reply.object == "chat.completion"
        assert reply.choices[0].finish_reason == "length"  # the tiny model never stops
        assert reply.usage is not None and reply.usage.completion_tokens == MAX_TOKENS
        return raw.headers["x-upstream-replica"], reply.choices[0].message.content or ""

    async def _streamed(self) -> tuple[str, str]:
        raw = await self.py.chat.completions.with_raw_response.create(
            model=self.model,
            messages=self.messages,  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
        )
        assert raw.status_code == 200
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers["x-upstream"] == "fleet"
        text = ""
        finish = None
        chunks = 0
        stream = raw.parse()
        assert isinstance(stream, openai.AsyncStream)
        async for chunk in stream:
            chunks += 1
            assert chunk.object == "chat.completion.chunk"
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        assert chunks > 0
        assert finish == "length"
        return raw.headers["x-upstream-replica"], text


async def conversations_on_both(
    py: openai.AsyncOpenAI, model: str, *, at_least: int, turns: int, most: int = 24
) -> list[Conversation]:
    """`at_least` conversations of `turns` turns each (distinct first messages), more
    until at least one is on each replica; fails past `most` (with two replicas
    and a fair hash, 24 all on one would be a chance of 2 in 16 million)."""
    started: list[Conversation] = []
    for n in range(most):
        if len(started) >= at_least and {c.replicas[0] for c in started} == {"0", "1"}:
            break
        conv = Conversation(py, model, f"Conversation {n}: what is the weather like on day {n}?")
        for _ in range(turns):
            await conv.turn()
        started.append(conv)
    on = {c.replicas[0] for c in started}
    assert on == {"0", "1"}, f"{len(started)} conversations, all on replica {on}"
    return started


def other(replica: str) -> str:
    return {"0": "1", "1": "0"}[replica]


async def test_turns_of_a_conversation_stay_on_their_replica(
    llama_fleet_proxy: ProxyFactory, llama_fleet: LlamaFleet
) -> None:
    client = await llama_fleet_proxy(FLEET)
    async with sdk(client) as py:
        convs = await conversations_on_both(py, llama_fleet.model, at_least=6, turns=4)
    for conv in convs:
        assert len(conv.replicas) == 4
        assert len(set(conv.replicas)) == 1, (conv.opening, conv.replicas)
        assert len(conv.messages) == 1 + 2 * 4  # system, then 4 user/assistant pairs


async def test_a_streamed_turn_lands_with_its_conversation(
    llama_fleet_proxy: ProxyFactory, llama_fleet: LlamaFleet
) -> None:
    """On each replica: two plain turns, a streamed one, a plain one again."""
    client = await llama_fleet_proxy(FLEET)
    async with sdk(client) as py:
        convs = await conversations_on_both(py, llama_fleet.model, at_least=2, turns=2)
        for replica in ("0", "1"):
            conv = next(c for c in convs if c.replicas[0] == replica)
            assert await conv.turn(stream=True) == replica
            assert await conv.turn() == replica
            assert await conv.turn(stream=True) == replica
            assert conv.replicas == [replica] * 5


RETRIES = [
    pytest.param("", id="retries-default"),
    pytest.param("    retries: {attempts: 2}\n", id="retries-2"),
]


@pytest.mark.parametrize("retries", RETRIES)
async def test_a_stopped_replica_hands_its_conversation_to_the_other(
    llama_fleet_proxy: ProxyFactory, llama_fleet: LlamaFleet, retries: str
) -> None:
    client = await llama_fleet_proxy(FLEET + retries)
    async with sdk(client) as py:
        convs = await conversations_on_both(py, llama_fleet.model, at_least=2, turns=2)
        moved = convs[0]
        held = moved.replicas[0]
        stays = next(c for c in convs if c.replicas[0] != held)  # on the replica that stays up
        with llama_fleet.stopped(int(held)):
            assert not llama_fleet.running(int(held))
            # the next turn: a real completion, from the other replica
            assert await moved.turn() == other(held)
            # and the turns after stay there, streamed or not
            assert await moved.turn() == other(held)
            assert await moved.turn(stream=True) == other(held)
            assert await moved.turn() == other(held)
            # the other replica's own conversation is undisturbed
            assert await stays.turn() == other(held)
            # a conversation started now goes to the replica that is up
            fresh = Conversation(py, llama_fleet.model, "A new conversation while one is down.")
            assert await fresh.turn() == other(held)
        assert moved.replicas == [held] * 2 + [other(held)] * 4


@pytest.mark.parametrize("retries", RETRIES)
async def test_a_streamed_first_turn_after_the_stop_is_answered(
    llama_fleet_proxy: ProxyFactory, llama_fleet: LlamaFleet, retries: str
) -> None:
    """The first request to reach the stopped replica (its circuit still closed) is a
    stream: it is relayed from the other replica."""
    client = await llama_fleet_proxy(FLEET + retries)
    async with sdk(client) as py:
        convs = await conversations_on_both(py, llama_fleet.model, at_least=2, turns=1)
        conv = convs[0]
        held = conv.replicas[0]
        with llama_fleet.stopped(int(held)):
            assert await conv.turn(stream=True) == other(held)
            assert await conv.turn() == other(held)


async def test_with_the_sdk_retrying_the_turn_after_the_stop_succeeds(
    llama_fleet_proxy: ProxyFactory, llama_fleet: LlamaFleet
) -> None:
    """The proxy's retries at their default and the SDK's at its own (2, it retries a
    502): what a client sees is the turn answered by the other replica."""
    client = await llama_fleet_proxy(FLEET)
    async with sdk(client, max_retries=2) as py:
        convs = await conversations_on_both(py, llama_fleet.model, at_least=2, turns=2)
        conv = convs[0]
        held = conv.replicas[0]
        with llama_fleet.stopped(int(held)):
            assert await conv.turn() == other(held)
            assert await conv.turn(stream=True) == other(held)
            assert await conv.turn() == other(held)
        assert conv.replicas == [held] * 2 + [other(held)] * 3
