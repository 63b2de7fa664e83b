"""A batch of turns committed to PostgreSQL whose answer was lost, retried by the
writer: every turn is in its session once; and what the writer guard skips."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from proxy.pgstore import open_database
from proxy.sessions.store.base import TurnRecord
from proxy.sessions.store.postgres import PostgresStore
from proxy.sessions.writer import Writer
from tests.sessions.test_store_retry import rec, texts


class LostReply(PostgresStore):
    """A real store whose first batch commits and is then reported as failed, as when
    the connection drops before the commit's answer arrives."""

    failed = False

    async def record_turns(self, records: Sequence[TurnRecord]) -> None:
        await super().record_turns(records)
        if not self.failed and len(records) > 1:
            self.failed = True
            raise ConnectionError("connection lost while reading the reply")


async def test_the_writer_retrying_a_committed_batch_writes_each_turn_once(pg_dsn: str) -> None:
    store = LostReply(await open_database(pg_dsn))
    writer = Writer(store)
    for sid, text in [("a", "a1"), ("b", "b1"), ("a", "a2"), ("a", "a3")]:
        writer.submit(rec(sid, text))
    task = asyncio.create_task(writer.run())
    await asyncio.wait_for(writer.queue.join(), 10)
    assert store.failed
    writer.submit(rec("a", "a4"))
    await asyncio.wait_for(writer.queue.join(), 10)
    task.cancel()
    a = await store.get_session("k", "a")
    b = await store.get_session("k", "b")
    assert a is not None and texts(a) == ["a1", "a2", "a3", "a4"]
    assert a.turn_count == 4 and a.prompt_tokens == 8
    assert b is not None and texts(b) == ["b1"] and b.turn_count == 1
    await store.close()


async def test_a_turn_already_held_is_skipped_and_writers_do_not_mix(pg_dsn: str) -> None:
    store = PostgresStore(await open_database(pg_dsn))
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


async def test_batches_crossing_sessions_in_opposite_orders_do_not_deadlock(pg_dsn: str) -> None:
    """Two replicas write batches that touch the same sessions in opposite orders."""
    one = PostgresStore(await open_database(pg_dsn))
    two = PostgresStore(await open_database(pg_dsn))
    sids = [f"s{i}" for i in range(20)]

    async def write(store: PostgresStore, order: list[str], who: str) -> None:
        for round_ in range(10):
            await store.record_turns([rec(sid, f"{who}{round_}") for sid in order])

    await asyncio.wait_for(asyncio.gather(write(one, sids, "x"), write(two, sids[::-1], "y")), 30)
    for sid in sids:
        s = await one.get_session("k", sid)
        assert s is not None and s.turn_count == 20
        assert sorted(texts(s)) == sorted(
            [f"x{i}" for i in range(10)] + [f"y{i}" for i in range(10)]
        )
    await one.close()
    await two.close()
