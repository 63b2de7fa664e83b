"""validate's shortcuts for the common case must answer as the full checks do: a
message the shortcut lets through is one check_message accepts, and a body is found
finite exactly when the standard encoder (allow_nan=False) accepts it."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import ProxyError
from proxy.middleware import validate as v

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
)
trees = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
messages = st.one_of(
    trees,
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.one_of(
                st.sampled_from(["user", "assistant", "system", "developer", "tool", "bot"]),
                trees,
            ),
            "content": st.one_of(st.text(max_size=5), trees),
            "name": st.one_of(st.none(), st.text(max_size=3), trees),
            "tool_calls": st.one_of(st.none(), trees),
            "function_call": st.one_of(st.none(), trees),
            "tool_call_id": st.one_of(st.none(), st.text(max_size=3), trees),
        },
    ),
)


def outcome(fn: Any, *args: Any) -> Any:
    try:
        fn(*args)
    except ProxyError as err:
        return (err.status, err.message, err.param, err.code)
    return "ok"


@settings(max_examples=600, deadline=None)
@given(message=messages)
def test_a_message_is_judged_as_check_message_judges_it(message: Any) -> None:
    req = v.Request({"messages": [message]}, v.ValidateOptions())
    assert outcome(v.check_messages, "messages", [message], req) == outcome(
        v.check_message, "messages[0]", message
    )


def reference_first_non_finite(value: Any) -> tuple[str, float] | None:
    """The encoder decides whether to look; the walk names the first bad value."""
    try:
        json.JSONEncoder(allow_nan=False, ensure_ascii=False).encode(value)
        return None
    except ValueError:
        pass
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, float):
            if not math.isfinite(node):
                return where, node
        elif isinstance(node, dict):
            stack.extend(
                reversed([(f"{where}.{k}" if where else str(k), x) for k, x in node.items()])
            )
        elif isinstance(node, list):
            stack.extend(reversed([(f"{where}[{i}]", x) for i, x in enumerate(node)]))
    return None


@settings(max_examples=600, deadline=None)
@given(body=trees)
def test_non_finite_numbers_are_found_as_the_encoder_finds_them(body: Any) -> None:
    got = v.first_non_finite(body, "")
    want = reference_first_non_finite(body)
    assert repr(got) == repr(want)  # repr: NaN is not equal to itself


@pytest.mark.parametrize(
    "body",
    [
        {"a": (1.0, math.inf)},  # a tuple: not JSON, so the encoder judges
        {"a": [1, {"b": math.nan}]},
        {"messages": [{"role": "user", "content": "x"}], "temperature": -math.inf},
    ],
    ids=repr,
)
def test_non_json_values_and_nested_infinities(body: Any) -> None:
    assert repr(v.first_non_finite(body, "")) == repr(reference_first_non_finite(body))


def test_values_the_encoder_refuses_still_raise() -> None:
    with pytest.raises(TypeError):
        v.first_non_finite({"a": object()}, "")
