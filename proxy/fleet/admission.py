"""Admission: requests wait here when every replica that could serve them is full
(`max_in_flight` each).

Higher `priority` first. Within one priority, keys share by start-time fair queuing:
a request of a key with weight w gets the tag max(virtual time, the key's last tag)
+ 1/w, and the waiter with the smallest tag goes first, the virtual time becoming
its tag. A key that floods only pushes its own tags ahead, so a lighter key's
requests are served within its share whatever the other sends. A freed slot is
handed to its waiter directly (no thundering herd); a waiter that leaves (its
client gone, its wait over) leaves the queue at once.

The places are shared alike: when all `max_waiting` are taken, an arrival pushes out
the newest waiter of the key holding the most places for its weight (of a lower
priority first), when that key holds more than the arrival's key would; otherwise
the arrival is refused. A key that floods fills the queue only with itself.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar

from proxy.config import QueueConfig
from proxy.errors import ProxyError


class Seat(Protocol):
    """What admission counts on a replica."""

    in_flight: int


R = TypeVar("R", bound=Seat)
R_co = TypeVar("R_co", bound=Seat, covariant=True)


class Seats(Protocol[R_co]):
    """What admission asks of an upstream: a replica with room, for an affinity key."""

    def choose(self, point: int | None) -> R_co | None: ...


U = TypeVar("U", bound=Seats[Any])


class Waiter(Generic[U, R]):
    __slots__ = ("future", "key", "point", "priority", "queued", "tag", "upstreams", "weight")

    def __init__(
        self,
        future: asyncio.Future[tuple[U, R]],
        upstreams: Sequence[U],
        point: int | None,
        key: str,
        tag: float,
        priority: int,
        weight: float,
    ) -> None:
        self.future = future
        self.weight = weight
        self.upstreams = upstreams
        self.point = point  # its affinity key, for the replica it gets
        self.key = key
        self.tag = tag
        self.priority = priority
        self.queued = True


class _Level:
    """The waiters of one priority, by key."""

    __slots__ = ("keys", "last_tag", "vtime")

    def __init__(self) -> None:
        self.keys: dict[str, deque[Waiter[Any, Any]]] = {}
        self.last_tag: dict[str, float] = {}
        self.vtime = 0.0


class Admission(Generic[U, R]):
    def __init__(self, cfg: QueueConfig) -> None:
        self.max_waiting = cfg.max_waiting
        self.max_wait = cfg.max_wait_seconds
        self.waiting = 0
        self._levels: dict[int, _Level] = {}
        self._order: list[int] = []  # priorities with waiters, highest first

    async def wait(
        self,
        upstreams: Sequence[U],
        point: int | None,
        key: str,
        priority: int,
        weight: float,
    ) -> tuple[U, R]:
        """Wait for a slot on one of `upstreams` (each full now); the replica comes
        reserved (its in_flight counted). 429 when the queue is full (for this
        key: see above), 503 when the wait is over."""
        if self.waiting >= self.max_waiting:
            victim = self._victim(key, priority, weight)
            if victim is None:
                raise self._full()
            self._leave(victim)
            victim.future.set_exception(self._full())
        level = self._levels.get(priority)
        if level is None:
            level = self._levels[priority] = _Level()
        if not level.keys:
            self._order = sorted({*self._order, priority}, reverse=True)
        start = max(level.vtime, level.last_tag.get(key, 0.0))
        tag = start + 1.0 / weight
        level.last_tag[key] = tag
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[U, R]] = loop.create_future()
        waiter: Waiter[U, R] = Waiter(future, upstreams, point, key, start, priority, weight)
        queue = level.keys.get(key)
        if queue is None:
            queue = level.keys[key] = deque()
        queue.append(waiter)
        self.waiting += 1
        try:
            async with asyncio.timeout(self.max_wait):
                return await future
        except TimeoutError:
            if future.done() and not future.cancelled():
                return future.result()  # handed a slot as the wait ran out
            self._leave(waiter)
            raise ProxyError(
                503,
                f"Every backend for this model stayed busy for {self.max_wait:g} seconds.",
                code="queue_timeout",
                headers={
                    "Retry-After": str(after := max(1, round(self.max_wait / 10))),
                    "retry-after-ms": str(after * 1000),
                },
            ) from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # handed a slot as its client left: hand it on
                up, replica = future.result()
                replica.in_flight -= 1
                self.released(up)
            else:
                self._leave(waiter)
            raise

    def _full(self) -> ProxyError:
        return ProxyError(
            429,
            f"Every backend for this model is busy and {self.waiting} requests are "
            "already waiting; retry shortly.",
            code="queue_full",
            headers={"Retry-After": "1", "retry-after-ms": "1000"},
        )

    def _victim(self, key: str, priority: int, weight: float) -> Waiter[Any, Any] | None:
        """The waiter an arrival of `key` pushes out of a full queue, if any."""
        level = self._levels.get(priority)
        mine = (len(level.keys.get(key, ())) + 1) / weight if level is not None else 1 / weight
        best: tuple[int, float] | None = None
        victim: Waiter[Any, Any] | None = None
        for p, other in self._levels.items():
            for k, queue in other.keys.items():
                if k == key or not queue:
                    continue
                rank = (p, -len(queue) / queue[0].weight)
                if best is None or rank < best:
                    best, victim = rank, queue[-1]
        if best is None or victim is None:
            return None
        if best[0] < priority or (best[0] == priority and -best[1] > mine):
            return victim
        return None

    def released(self, up: U) -> None:
        """A slot of `up` is free: hand it to the first waiter that may use it."""
        if not self.waiting:
            return
        for priority in self._order:
            level = self._levels[priority]
            best: Waiter[Any, Any] | None = None
            for queue in level.keys.values():
                for waiter in queue:
                    if up in waiter.upstreams:
                        if best is None or waiter.tag < best.tag:
                            best = waiter
                        break
            if best is None:
                continue
            replica = up.choose(best.point)
            if replica is None:
                return
            replica.in_flight += 1
            level.vtime = best.tag
            self._leave(best)
            best.future.set_result((up, replica))
            return

    def _leave(self, waiter: Waiter[Any, Any]) -> None:
        if not waiter.queued:
            return
        waiter.queued = False
        level = self._levels[waiter.priority]
        queue = level.keys[waiter.key]
        queue.remove(waiter)
        if not queue:
            del level.keys[waiter.key]
            level.last_tag.pop(waiter.key, None)
            if not level.keys:
                self._order = [p for p in self._order if p != waiter.priority]
        self.waiting -= 1
