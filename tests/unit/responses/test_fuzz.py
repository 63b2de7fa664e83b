"""Whatever JSON arrives, the translation answers with a 400 or a valid translation,
and the stream with valid events: never a crash."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import ProxyError
from proxy.responses.answer import to_response
from proxy.responses.events import StreamTranslator
from proxy.responses.translate import to_chat

from .fixtures import CREATED, RID, call, check_events, response

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-3, 3) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)

KEYS = [
    "model",
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "text",
    "include",
    "metadata",
    "stream",
    "temperature",
    "max_output_tokens",
    "reasoning",
    "store",
    "top_logprobs",
]


def near(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys), json_values, max_size=5)


item = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(
            ["message", "function_call", "function_call_output", "reasoning", "x"]
        ),
        "role": st.sampled_from(["user", "assistant", "system", "developer", "tool"]),
        "content": json_values
        | st.lists(near(["type", "text", "image_url", "refusal"]), max_size=2),
        "call_id": json_values,
        "name": json_values,
        "arguments": json_values,
        "output": json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(body=near(KEYS), items=st.none() | st.lists(item, max_size=3))
def test_to_chat_never_crashes(body: dict[str, Any], items: list[dict[str, Any]] | None) -> None:
    if items is not None:
        body["input"] = items
    try:
        c = to_chat(body)
    except ProxyError as err:
        assert err.status == 400 and err.param
        return
    assert isinstance(c.body["messages"], list)
    response(to_response({"choices": []}, c, RID, CREATED))


delta = st.fixed_dictionaries(
    {},
    optional={
        "role": st.just("assistant"),
        "content": st.none() | st.text(max_size=4),
        "reasoning_content": st.none() | st.text(max_size=4),
        "refusal": st.none() | st.text(max_size=3),
        "tool_calls": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "index": st.integers(0, 2) | st.none(),
                    "id": st.sampled_from(["a", "b", ""]) | st.none(),
                    "function": st.fixed_dictionaries(
                        {},
                        optional={
                            "name": st.sampled_from(["f", "g", ""]) | st.none(),
                            "arguments": st.text(max_size=4) | st.none(),
                        },
                    ),
                },
            ),
            max_size=2,
        ),
    },
)
chunk = (
    st.fixed_dictionaries(
        {
            "choices": st.lists(
                st.fixed_dictionaries(
                    {"index": st.sampled_from([0, 0, 0, 1]), "delta": delta},
                    optional={
                        "finish_reason": st.sampled_from(
                            ["stop", "length", "tool_calls", "content_filter", None]
                        )
                    },
                ),
                max_size=1,
            )
        },
        optional={
            "usage": st.just({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}),
            "model": st.text(max_size=3),
        },
    )
    | st.just({"error": {"message": "boom"}})
    | json_values
)


@settings(max_examples=400, deadline=None)
@given(chunks=st.lists(chunk, max_size=8), end=st.booleans())
def test_any_chunks_make_a_valid_event_sequence(chunks: list[Any], end: bool) -> None:
    t = StreamTranslator(call(stream=True), RID, CREATED)
    events = []
    for c in chunks:
        events += t.on_chunk(c)
    events += t.on_end() if end else t.on_error({"message": "x"})
    check_events(events)
    assert events[-1][1]["response"] == t.response
    response(t.response)
    # deltas concatenate to the final text and arguments, item by item
    texts: dict[tuple[int, int], str] = {}
    args: dict[int, str] = {}
    for kind, p in events:
        if kind == "response.output_text.delta":
            key = (p["output_index"], p["content_index"])
            texts[key] = texts.get(key, "") + p["delta"]
        elif kind == "response.function_call_arguments.delta":
            args[p["output_index"]] = args.get(p["output_index"], "") + p["delta"]
    output = t.response["output"]
    for (i, j), text in texts.items():
        assert output[i]["content"][j]["text"] == text
    for i, arguments in args.items():
        assert output[i]["arguments"] == arguments
