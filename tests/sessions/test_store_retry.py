"""A batch of turns written to Redis, retried after a failure half-way (or after its
reply was lost): every turn is in its session once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy.sessions.store.base import TurnRecord
from proxy.sessions.store.redis import RedisStore
from proxy.sessions.writer import Writer

REDIS_URL = "redis://127.0.0.1:6379/0"


class LostReply(RedisStore):
    """A real Redis store whose first batch is written and then reported as failed,
    as when the connection drops before the pipeline's reply arrives."""

    failed = False

    async def record_turns(self, records: Sequence[TurnRecord]) -> None:
        await super().record_turns(records)
        if not self.failed and len(records) > 1:
            self.failed = True
            raise ConnectionError("connection lost while reading the reply")


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    prefix = f"test-retry-{uuid.uuid4().hex[:8]}:"
    yield prefix
    r = aioredis.from_url(REDIS_URL)
    keys = [k async for k in r.scan_iter(match=prefix + "*")]
    if keys:
        await r.delete(*keys)
    await r.aclose()


def rec(session_id: str, text: str) -> TurnRecord:
    return TurnRecord(
        owner="k",
        session_id=session_id,
        at=1_700_000_000.0,
        source="header",
        key_id="k",
        model="m",
        turn={"created": 1, "messages": [{"role": "user", "content": text}]},
        prompt_tokens=2,
        total_tokens=2,
    )


def texts(session: Any) -> list[str]:
    return [t["messages"][0]["content"] for t in session.turns]


async def test_the_writer_retrying_a_batch_whose_reply_was_lost_writes_each_turn_once(
    prefix: str,
) -> None:
    store = LostReply(REDIS_URL, prefix)
    writer = Writer(store)
    for sid, text in [("a", "a1"), ("b", "b1"), ("a", "a2"), ("a", "a3")]:
        writer.submit(rec(sid, text))
    task = asyncio.create_task(writer.run())
    await asyncio.wait_for(writer.queue.join(), 5)
    assert store.failed  # the batch was written, reported failed, and retried
    writer.submit(rec("a", "a4"))  # and the writer goes on
    await asyncio.wait_for(writer.queue.join(), 5)
    task.cancel()
    a = await store.get_session("k", "a")
    b = await store.get_session("k", "b")
    assert a is not None and texts(a) == ["a1", "a2", "a3", "a4"]
    assert a.turn_count == 4 and a.prompt_tokens == 8
    assert b is not None and texts(b) == ["b1"] and b.turn_count == 1
    await store.close()


async def test_a_turn_already_held_is_skipped_and_writers_do_not_mix(prefix: str) -> None:
    store = RedisStore(REDIS_URL, prefix)
    first = [rec("s", "t1"), rec("s", "t2")]
    for seq, r in enumerate(first, 1):
        r.writer, r.seq = "w:one", seq
    await store.record_turns(first)
    await store.record_turns(first)  # the same batch again: nothing added
    other = rec("s", "o1")
    other.writer, other.seq = "w:two", 1  # another process's writer: its own numbers
    later = rec("s", "t3")
    later.writer, later.seq = "w:one", 3
    await store.record_turns([other, later])
    unguarded = rec("s", "plain")  # written without a writer: always appended
    await store.record_turns([unguarded])
    await store.record_turns([unguarded])
    s = await store.get_session("k", "s")
    assert s is not None
    assert texts(s) == ["t1", "t2", "o1", "t3", "plain", "plain"]
    assert s.turn_count == 6
    await store.close()
