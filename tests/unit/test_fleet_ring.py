"""Consistent hashing with bounded loads: the same mapping from the same list, only a
replica's own share moves when it goes, and no replica over the bound."""

from __future__ import annotations

import math
import random

from proxy.fleet.ring import Ring, key_hash

NAMES = [f"http://10.0.0.{i}:8000/v1" for i in range(1, 6)]
POINTS = [key_hash(f"conversation-{i}".encode()) for i in range(5000)]


def owners(ring: Ring, names: list[str], usable: list[bool] | None = None) -> list[str]:
    usable = usable or [True] * len(names)
    loads = [0.0] * len(names)
    out = []
    for p in POINTS:
        picked = ring.pick(p, loads, usable, 1.25)
        assert picked is not None
        out.append(names[picked[0]])
    return out


def test_the_order_of_the_list_does_not_change_the_mapping() -> None:
    shuffled = NAMES[::-1]
    assert owners(Ring(NAMES), NAMES) == owners(Ring(shuffled), shuffled)


def test_each_replica_owns_about_its_share() -> None:
    counts = {n: 0 for n in NAMES}
    for name in owners(Ring(NAMES), NAMES):
        counts[name] += 1
    fair = len(POINTS) / len(NAMES)
    assert all(0.75 * fair < c < 1.25 * fair for c in counts.values()), counts


def test_a_replica_that_goes_down_moves_only_its_own_keys_and_they_come_back() -> None:
    ring = Ring(NAMES)
    before = owners(ring, NAMES)
    down = [True, True, False, True, True]
    during = owners(ring, NAMES, down)
    moved = [(b, d) for b, d in zip(before, during, strict=True) if b != d]
    assert moved and all(b == NAMES[2] for b, _ in moved)
    assert NAMES[2] not in during
    # its keys spread over the others, not onto one neighbour
    assert len({d for _, d in moved}) >= 3
    assert owners(ring, NAMES) == before


def test_a_replica_over_the_bound_passes_its_key_on_and_says_whose_it_was() -> None:
    ring = Ring(NAMES)
    point = POINTS[0]
    home = ring.owner(point)
    loads = [0.0] * 5
    loads[home] = 10.0
    picked = ring.pick(point, loads, [True] * 5, 1.25)
    assert picked is not None
    chosen, first = picked
    assert first == home and chosen != home
    # under the bound (here: every replica as busy as it) it stays home
    loads = [1.0] * 5
    assert ring.pick(point, loads, [True] * 5, 1.25) == (home, home)


def test_placing_keys_one_by_one_never_exceeds_the_bound() -> None:
    ring = Ring(NAMES)
    rng = random.Random(7)
    loads = [0.0] * 5
    # a skewed stream: half of the requests are one hot conversation
    for i in range(2000):
        point = POINTS[0] if rng.random() < 0.5 else POINTS[rng.randrange(len(POINTS))]
        picked = ring.pick(point, loads, [True] * 5, 1.25)
        assert picked is not None
        loads[picked[0]] += 1
        bound = math.ceil(1.25 * (i + 1) / 5)
        assert max(loads) <= bound
    assert max(loads) / (sum(loads) / 5) <= 1.25 + 5 / 2000


def test_no_usable_replica_is_none() -> None:
    assert Ring(NAMES).pick(POINTS[0], [0.0] * 5, [False] * 5, 1.25) is None


def test_replica_names_must_be_distinct() -> None:
    try:
        Ring(["a", "a"])
    except ValueError:
        return
    raise AssertionError("a repeated name was accepted")
