"""The affinity key: a conversation's turns share it, different conversations do not,
and a conversation the client names is keyed per API key."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import make_mocked_request

from proxy.exchange import Exchange, Identity
from proxy.fleet.affinity import affinity_point
from proxy.routes import CHAT


def exchange(body: dict[str, Any] | None, key: str = "k", **fields: Any) -> Exchange:
    ex = Exchange(
        request=make_mocked_request("POST", "/v1/chat/completions"),
        route=CHAT,
        scope="chat",
        request_id="r",
        body=body,
        identity=Identity(id=key),
    )
    for name, value in fields.items():
        setattr(ex, name, value)
    return ex


SYSTEM = {"role": "system", "content": "You are terse."}


def turns(first: str, n: int) -> list[dict[str, str]]:
    history: list[dict[str, str]] = [SYSTEM, {"role": "user", "content": first}]
    for i in range(n):
        history += [
            {"role": "assistant", "content": f"answer {i}"},
            {"role": "user", "content": f"question {i}"},
        ]
    return history


def test_every_turn_of_a_conversation_has_one_key() -> None:
    points = {affinity_point(exchange({"messages": turns("plan a trip", n)})) for n in range(6)}
    assert len(points) == 1 and None not in points


def test_conversations_with_other_first_messages_have_other_keys() -> None:
    points = {affinity_point(exchange({"messages": turns(f"task {i}", 2)})) for i in range(50)}
    assert len(points) == 50


def test_a_named_conversation_keeps_its_key_whatever_the_messages_and_is_per_api_key() -> None:
    a = affinity_point(exchange({"messages": turns("x", 1)}, conversation_id="conv-1"))
    b = affinity_point(exchange({"messages": turns("y", 3)}, conversation_id="conv-1"))
    other_key = affinity_point(
        exchange({"messages": turns("x", 1)}, key="k2", conversation_id="conv-1")
    )
    assert a == b and a != other_key
    header = affinity_point(
        exchange({"messages": turns("z", 0)}, session_id="s-1", session_source="header")
    )
    assert header == affinity_point(
        exchange({"messages": turns("w", 2)}, session_id="s-1", session_source="header")
    )


def test_a_detected_session_goes_by_its_id_even_when_its_history_is_trimmed() -> None:
    full = exchange({"messages": turns("q", 4)}, session_id="sess_a", session_source="continued")
    trimmed = exchange(
        {"messages": [SYSTEM, {"role": "user", "content": "question 3"}]},
        session_id="sess_a",
        session_source="continued",
    )
    assert affinity_point(full) == affinity_point(trimmed)
    other = exchange({"messages": turns("q", 4)}, session_id="sess_b", session_source="continued")
    assert affinity_point(other) != affinity_point(full)


def test_completions_go_by_their_prompt_and_no_body_has_no_key() -> None:
    long = "context " * 1000
    assert affinity_point(exchange({"prompt": long + "end 1"})) == affinity_point(
        exchange({"prompt": long + "end 2"})
    )
    assert affinity_point(exchange({"prompt": ["a", "b"]})) == affinity_point(
        exchange({"prompt": "a"})
    )
    assert affinity_point(exchange(None)) is None
