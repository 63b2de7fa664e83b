"""Session ids the proxy makes: `sess_`, the creation time in milliseconds, then 128
random bits. Nothing in them counts sessions or links two sessions of one process."""

from __future__ import annotations

import itertools
import re
import time

import pytest

from proxy.sessions import ids as session_ids
from proxy.sessions.ids import SAFE_ID, new_session_id

SHAPE = re.compile(r"^sess_(?P<ms>[0-9a-f]{12})(?P<random>[0-9a-f]{32})$")


def parts(sid: str) -> tuple[int, str]:
    m = SHAPE.match(sid)
    assert m is not None, sid
    return int(m["ms"], 16), m["random"]


def common_prefix(*texts: str) -> int:
    """How many leading characters all the texts share."""
    shortest = min(len(t) for t in texts)
    for i in range(shortest):
        if len({t[i] for t in texts}) > 1:
            return i
    return shortest


def test_ids_are_the_time_then_at_least_96_random_bits() -> None:
    before = int(time.time() * 1000)
    ids = [new_session_id() for _ in range(20_000)]
    after = int(time.time() * 1000)
    assert len(set(ids)) == len(ids)
    split = [parts(sid) for sid in ids]
    for sid, (ms, random) in zip(ids, split, strict=True):
        assert before <= ms <= after
        assert len(random) * 4 >= 96
        assert SAFE_ID.match(sid)  # a client may pin it with the X-Session-Id header
    randoms = [random for _, random in split]
    # no prefix shared beyond the time: not by all ids, not by consecutive ones
    # (two random 32-digit strings share 8 leading digits once in 4 billion)
    assert common_prefix(*randoms) == 0
    assert max(common_prefix(a, b) for a, b in itertools.pairwise(randoms)) < 8
    # every one of the 128 bits varies: each digit takes all 16 values somewhere
    for position in range(32):
        assert len({r[position] for r in randoms}) == 16, position
    # nor does anything count: consecutive ids are not a small step apart
    values = [int(r, 16) for r in randoms]
    assert min(abs(b - a) for a, b in itertools.pairwise(values)) > 2**64


def test_ids_of_one_millisecond_differ_in_their_random_part(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_ids, "clock", lambda: 1_796_000_000.1234)
    ids = [new_session_id() for _ in range(1000)]
    split = [parts(sid) for sid in ids]
    assert {ms for ms, _ in split} == {1_796_000_000_123}
    randoms = [random for _, random in split]
    assert len(set(randoms)) == len(randoms)
    assert max(common_prefix(a, b) for a, b in itertools.pairwise(randoms)) < 8


def test_ids_sort_by_creation_time(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter(range(1_796_000_000_000, 1_796_000_000_500))
    monkeypatch.setattr(session_ids, "clock", lambda: next(ticks) / 1000)
    ids = [new_session_id() for _ in range(500)]
    assert sorted(ids) == ids
    assert [parts(sid)[0] for sid in ids] == list(range(1_796_000_000_000, 1_796_000_000_500))
