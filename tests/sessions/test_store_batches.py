"""One batch of turns (the writer's transaction) holding several turns of one session,
sessions created and continued side by side, and turn values that only the standard
JSON encoder writes: every store keeps them in order and reads them back as sent."""

from __future__ import annotations

import math
from typing import Any

import pytest

from proxy.sessions.store import SessionStore, TurnRecord


def rec(
    sid: str,
    text: Any,
    *,
    owner: str = "k",
    opening: list[Any] | None = None,
    digests: tuple[str, ...] = (),
    at: float = 1_700_000_000.0,
) -> TurnRecord:
    return TurnRecord(
        owner=owner,
        session_id=sid,
        at=at,
        source="header" if opening is not None else "new",
        key_id=owner,
        model="m",
        turn={
            "created": int(at),
            "messages": [{"role": "user", "content": text}],
            "response": {"role": "assistant", "content": "ok", "tool_calls": None},
            "finish_reason": "stop",
            "model": "m",
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            "latency_ms": 1,
        },
        opening=opening,
        prompt_tokens=1,
        completion_tokens=1,
        total_tokens=2,
        digests=digests,
    )


def contents(session: Any) -> list[Any]:
    return [[m["content"] for m in t["messages"]] for t in session.turns]


async def test_turns_of_one_session_in_one_batch_keep_their_order(store: SessionStore) -> None:
    await store.record_turns([rec("old", "o1")])
    opening = [{"role": "system", "content": "sys"}, {"role": "user", "content": "a1"}]
    await store.record_turns(
        [
            rec("a", "a1", opening=opening, digests=("d1",)),
            rec("old", "o2"),
            rec("a", "a2", opening=opening, digests=("d2",)),
            rec("b", "b1"),
            rec("a", "a3", opening=opening, digests=("d1",)),
            rec("a", "x1", owner="other"),
            rec("old", "o3"),
        ]
    )
    a = await store.get_session("k", "a")
    assert a is not None and a.turn_count == 3 and a.total_tokens == 6
    # the opening replaces the first turn's messages only
    assert contents(a) == [["sys", "a1"], ["a2"], ["a3"]]
    old = await store.get_session("k", "old")
    assert old is not None and old.turn_count == 3
    assert contents(old) == [["o1"], ["o2"], ["o3"]]
    b = await store.get_session("k", "b")
    assert b is not None and contents(b) == [["b1"]]
    other = await store.get_session("other", "a")
    assert other is not None and contents(other) == [["x1"]]
    assert await store.find_session("k", "d1") == "a"
    assert await store.find_session("k", "d2") == "a"


@pytest.mark.parametrize(
    "value",
    [
        'plain ✓ ünïcode \u2028 \x00 "quoted" \\',
        2**70,
        -(2**64),
        1e16,
        -0.0,
        5e-324,
        [1.5, {"nested": [True, None, "x"]}],
        {"1": "keys", "": "empty"},
    ],
    ids=repr,
)
async def test_values_read_back_as_sent(store: SessionStore, value: Any) -> None:
    await store.record_turns([rec("v", value)])
    got = await store.get_session("k", "v")
    assert got is not None and got.turns is not None
    back = got.turns[0]["messages"][0]["content"]
    assert back == value
    assert repr(back) == repr(value)  # -0.0 stays -0.0, an integer stays an integer


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
async def test_non_finite_numbers_read_back_as_the_standard_encoder_wrote_them(
    store: SessionStore, value: float
) -> None:
    await store.record_turns([rec("n", [value])])
    got = await store.get_session("k", "n")
    assert got is not None and got.turns is not None
    back = got.turns[0]["messages"][0]["content"][0]
    assert isinstance(back, float)
    assert repr(back) == repr(value)
