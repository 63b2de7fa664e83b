"""The background writer: session writes leave the request's path.

A completion callback queues the turn for the writer, which commits within
milliseconds, several turns to one transaction under load. Lookups see queued turns
(`Writer.queued`), so a client that sends its next message at once still continues.

While the store is unavailable (Redis gone or failing over, a master demoted, a
database restarting) the writer keeps the batch it holds and tries it again, waiting
a little longer each time up to a second, until the store takes it; the turns that
arrive meanwhile queue behind it, up to MAX_PENDING, and are written when the store is
back. A batch retried after a failure half-way never duplicates a turn: every turn
carries this writer's token and its number, and a store skips a turn it already holds
(TurnRecord.writer, seq). Turns past the bound, turns the store refuses while it
answers, and turns still queued when the proxy stops with the store away are
dropped: counted in chat_proxy_session_turns_dropped_total and logged (at most every
10 s, with the count since).

A store says what is an outage with `unavailable(exc) -> bool` where it can (the
Redis store does); for any other failure the writer asks the store's `ping`, and a
store that answers it is taken to refuse the write itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from proxy import metrics
from proxy.sessions.store import SessionStore, TurnRecord

log = logging.getLogger("chat_proxy.session")

MAX_PENDING = 10_000  # queued writes; beyond this turns are dropped (and logged)
BATCH = 200  # turns written in one transaction at most
GATHER = 0.005  # seconds a write waits for more turns to share its transaction
RETRY_FIRST = 0.05  # seconds before trying an unavailable store again, doubling...
RETRY_MAX = 1.0  # ... up to this
PING_TIMEOUT = 1.0  # seconds for the store to answer whether it is up
REFUSED_TRIES = 3  # writes of one turn the store refuses while it answers
LOG_EVERY = 10.0  # seconds between two logs of dropped turns
STOP_OUTAGE_WAIT = 2.0  # seconds a stop waits for a store that is unavailable


class _Drops:
    """Dropped turns: counted at once, logged at most every LOG_EVERY seconds."""

    def __init__(self) -> None:
        self._next = 0.0
        self._since = 0
        self._message = ""
        self._cause: BaseException | None = None
        self._children: dict[str, Any] = {}

    def __call__(
        self,
        reason: str,
        n: int,
        message: str,
        *,
        now: bool = False,
        cause: BaseException | None = None,
    ) -> None:
        if n <= 0:
            return
        child = self._children.get(reason)
        if child is None:
            child = self._children[reason] = metrics.SESSION_TURNS_DROPPED.labels(reason)
        child.inc(n)
        self._since += n
        self._message = message
        self._cause = cause
        if now or time.monotonic() >= self._next:
            self.report()

    def report(self) -> None:
        """Log the drops not logged yet."""
        if self._since:
            log.error(
                "%s; %d session turn(s) dropped",
                self._message,
                self._since,
                exc_info=self._cause,
            )
            self._since = 0
            self._cause = None
            self._next = time.monotonic() + LOG_EVERY


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
        self._writing = 0  # turns of the batch being written
        self._task: asyncio.Task[None] | None = None
        self._down_since: float | None = None  # when the store became unavailable
        self._drops = _Drops()

    def submit(self, rec: TurnRecord) -> None:
        if self._waiting >= MAX_PENDING:
            self._drops(
                "queue_full",
                1,
                f"session writes are falling behind ({MAX_PENDING} turns pending"
                f"{', the store is unavailable' if self._down_since is not None else ''})",
            )
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

    @property
    def unwritten(self) -> int:
        """Turns submitted and not written yet."""
        return self._waiting + self._writing

    async def _unavailable(self, exc: BaseException) -> bool:
        says = getattr(self.store, "unavailable", None)
        if callable(says) and says(exc):
            return True
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                return not await self.store.ping()
        except Exception:
            return True

    async def _attempt(self, records: list[TurnRecord], tries: int) -> BaseException | None:
        """Write `records`, trying again for as long as the store is unavailable and
        `tries` times in all while it answers; None once written, else what the store
        last raised."""
        delay = RETRY_FIRST
        while True:
            try:
                await self.store.record_turns(records)
            except Exception as exc:
                if await self._unavailable(exc):
                    if self._down_since is None:
                        self._down_since = time.monotonic()
                        log.warning(
                            "session store unavailable (%s: %s); keeping the turns and "
                            "trying again",
                            type(exc).__name__,
                            exc,
                        )
                    metrics.SESSION_TURNS_PENDING.set(self.unwritten)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                tries -= 1
                if tries <= 0:
                    return exc
                await asyncio.sleep(0.1)
                continue
            if self._down_since is not None:
                log.warning(
                    "session store available again after %.1f s; %d turn(s) kept meanwhile "
                    "are being written",
                    time.monotonic() - self._down_since,
                    self.unwritten,
                )
                self._down_since = None
                self._drops.report()
            return None

    async def _write(self, records: list[TurnRecord]) -> None:
        failed = await self._attempt(records, 1 if len(records) > 1 else REFUSED_TRIES)
        if failed is None:
            return
        if len(records) > 1:
            # one bad turn must not take the batch down: write them one by one
            log.warning(
                "session batch write failed (%s); writing its %d turns one by one",
                failed,
                len(records),
            )
            for rec in records:
                await self._write([rec])
            return
        self._drops(
            "refused",
            1,
            "session store write failed: the store answers but refused the turn",
            cause=failed,
        )

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
                self._writing = len(batch)
                await self._write([rec for _, rec in batch])
            finally:
                self._writing = 0
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
                if self._down_since is None:
                    metrics.SESSION_TURNS_PENDING.set(self._waiting)

    async def flush(self, timeout: float = 2.0, *, outage: bool = False) -> None:
        """Wait until every queued turn is written (or the timeout passes); at once
        while the store is unavailable, unless `outage` (waiting would not help a
        reader of the store, which is away too)."""
        if self._task is None or (self._down_since is not None and not outage):
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), timeout)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="session-writer")

    async def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (`timeout` at most, STOP_OUTAGE_WAIT once the store is
        found unavailable: a little time to come back, as at the end of a failover),
        then stop."""
        if self._task is not None:
            started = time.monotonic()
            deadline = started + timeout
            joined = asyncio.ensure_future(self.queue.join())
            try:
                while not joined.done():
                    if self._down_since is not None:
                        deadline = min(deadline, started + STOP_OUTAGE_WAIT)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    await asyncio.wait({joined}, timeout=min(left, 0.05))
            finally:
                joined.cancel()
            lost = self.unwritten
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            self._drops.report()
            self._drops(
                "shutdown",
                lost,
                "the proxy stopped before the session store took every turn",
                now=True,
            )
            metrics.SESSION_TURNS_PENDING.set(0)
