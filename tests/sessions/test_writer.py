"""The session writer: one turn the store refuses does not take its batch down."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from proxy.sessions.store.base import TurnRecord
from proxy.sessions.store.memory import MemoryStore
from proxy.sessions.writer import Writer


class Picky(MemoryStore):
    """A real memory store that refuses any write holding a turn of session "bad"
    (as SQLite refuses a whole transaction when one statement fails)."""

    async def record_turns(self, records: Sequence[TurnRecord]) -> None:
        if any(r.session_id == "bad" for r in records):
            raise ValueError("refused")
        await super().record_turns(records)


def rec(session_id: str) -> TurnRecord:
    return TurnRecord(
        owner="k",
        session_id=session_id,
        at=1.0,
        source="new",
        key_id="k",
        model="m",
        turn={"created": 1, "messages": [], "response": {"role": "assistant", "content": "x"}},
    )


async def test_a_refused_turn_loses_only_itself() -> None:
    store = Picky()
    writer = Writer(store)
    names = [f"s{i}" for i in range(5)]
    for name in [*names[:2], "bad", *names[2:]]:
        writer.submit(rec(name))
    task = asyncio.create_task(writer.run())
    await asyncio.wait_for(writer.queue.join(), 5)
    task.cancel()
    for name in names:
        got: Any = await store.get_session("k", name)
        assert got is not None and got.turn_count == 1, name
    assert await store.get_session("k", "bad") is None
