"""Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018).

Each replica owns `VNODES` points on a ring of 64-bit hashes, placed by a hash of its
address, so every proxy that reads the same replica list computes the same ring, and
the order of the list does not matter. A key goes to the first replica clockwise from
its hash that is up and whose load is under the bound: `load_factor` times the mean
load, counting the request being placed. A replica that goes down or comes back moves
only the keys it owns; a replica over the bound passes only the keys that overflow it,
each to its own next replica on the ring (so one hot replica's spill spreads out).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from hashlib import blake2b

VNODES = 160


def key_hash(data: bytes) -> int:
    """A 64-bit point on the ring for `data`."""
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


class Ring:
    """The ring of `names` (one per replica, in index order)."""

    __slots__ = ("_owners", "_points", "size")

    def __init__(self, names: Sequence[str], vnodes: int = VNODES) -> None:
        if len(set(names)) != len(names):
            raise ValueError("replica names must be distinct")
        points = sorted(
            (key_hash(f"{name}#{v}".encode()), index)
            for index, name in enumerate(names)
            for v in range(vnodes)
        )
        self._points = [p for p, _ in points]
        self._owners = [o for _, o in points]
        self.size = len(names)

    def owner(self, point: int) -> int:
        """The replica that owns `point` when every replica is up."""
        i = bisect_left(self._points, point)
        return self._owners[i % len(self._owners)]

    def pick(
        self,
        point: int,
        loads: Sequence[float],
        usable: Sequence[bool],
        load_factor: float,
    ) -> tuple[int, int] | None:
        """(the replica for `point`, its first usable owner on the ring), or None when
        no replica is usable. The first differs from the second when the owner is over
        the bound (a spill)."""
        n = 0
        total = 0.0
        for i in range(self.size):
            if usable[i]:
                n += 1
                total += loads[i]
        if n == 0:
            return None
        # the bound of the paper: ceil(c * m / n) with m the load including this one
        bound = max(1.0, math.ceil(load_factor * (total + 1) / n))
        owners = self._owners
        count = len(owners)
        i = bisect_left(self._points, point)
        seen = 0
        visited = [False] * self.size
        first = -1
        for step in range(count):
            owner = owners[(i + step) % count]
            if visited[owner]:
                continue
            visited[owner] = True
            seen += 1
            if usable[owner]:
                if first < 0:
                    first = owner
                if loads[owner] + 1 <= bound:
                    return owner, first
            if seen == self.size:
                break
        # loads read from the engines may exceed every bound: the least loaded then
        best = min((j for j in range(self.size) if usable[j]), key=lambda j: loads[j])
        return best, first
