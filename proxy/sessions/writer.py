"""The background writer: session writes leave the request's path.

A completion callback queues the turn for the writer, which commits within
milliseconds, several turns to one transaction under load. Lookups see queued turns
(`Writer.queued`), so a client that sends its next message at once still continues.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from proxy.sessions.store import SessionStore, TurnRecord

log = logging.getLogger("chat_proxy.session")

MAX_PENDING = 10_000  # queued writes; beyond this turns are dropped (and logged)
BATCH = 200  # turns written in one transaction at most
GATHER = 0.005  # seconds a write waits for more turns to share its transaction


class Writer:
    """Queues turns and writes them in batches off the request path.

    Turns join the open batch (a list); the queue carries batches, so the writer task
    is woken once per batch, not once per turn."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store
        # batches of (write number, turn): `queue.join()` returns when all are written
        self.queue: asyncio.Queue[list[tuple[int, TurnRecord]]] = asyncio.Queue()
        # digests of queued turns: (owner, digest) -> (session id, write number)
        self.pending: dict[tuple[str, str], tuple[str, int]] = {}
        self._seq = 0
        self.token = "w:" + os.urandom(6).hex()  # this writer, in the stores' guards
        self._batch: list[tuple[int, TurnRecord]] = []  # the batch new turns join
        self._waiting = 0  # turns submitted and not yet taken by the writer
        self._task: asyncio.Task[None] | None = None

    def submit(self, rec: TurnRecord) -> None:
        if self._waiting >= MAX_PENDING:
            log.error("session writes are falling behind; a turn of %s was dropped", rec.session_id)
            return
        self._seq += 1
        seq = self._seq
        rec.writer = self.token
        rec.seq = seq
        if rec.digests:
            entry = (rec.session_id, seq)
            owner = rec.owner
            pending = self.pending
            for d in rec.digests:
                pending[(owner, d)] = entry
        self._waiting += 1
        batch = self._batch
        batch.append((seq, rec))
        if len(batch) == 1:
            self.queue.put_nowait(batch)
        if len(batch) >= BATCH:
            self._batch = []

    def queued(self, owner: str, d: str) -> str | None:
        hit = self.pending.get((owner, d))
        return hit[0] if hit else None

    async def _write(self, records: list[TurnRecord]) -> None:
        if len(records) > 1:
            try:
                await self.store.record_turns(records)
                return
            except Exception:
                # one bad turn must not take the batch down: write them one by one
                log.warning(
                    "session batch write failed; writing its %d turns one by one", len(records)
                )
            for rec in records:
                await self._write([rec])
            return
        for attempt in range(3):
            try:
                await self.store.record_turns(records)
                return
            except Exception:
                if attempt == 2:
                    log.exception("session store write failed; %d turn(s) lost", len(records))
                    return
                await asyncio.sleep(0.1 * (attempt + 1))

    def _take(self, batch: list[tuple[int, TurnRecord]]) -> None:
        """Close the batch: the turns submitted from now on join the next one."""
        if batch is self._batch:
            self._batch = []
        self._waiting -= len(batch)

    async def run(self) -> None:
        while True:
            batch = await self.queue.get()
            taken = False
            try:
                if len(batch) < BATCH:
                    # under load the next turns are only milliseconds away: sharing
                    # one transaction (one commit) costs far less than one each
                    await asyncio.sleep(GATHER)
                self._take(batch)
                taken = True
                await self._write([rec for _, rec in batch])
            finally:
                if not taken:
                    self._take(batch)
                pending = self.pending
                for seq, rec in batch:
                    for d in rec.digests:
                        key = (rec.owner, d)
                        hit = pending.get(key)
                        if hit is not None and hit[1] == seq:
                            del pending[key]
                self.queue.task_done()

    async def flush(self, timeout: float = 2.0) -> None:
        """Wait until every queued turn is written (or the timeout passes)."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), timeout)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="session-writer")

    async def stop(self, timeout: float = 10.0) -> None:
        await self.flush(timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
