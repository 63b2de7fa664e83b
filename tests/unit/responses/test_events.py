"""Streamed chat completions as the Responses event sequence: every event validated
by the OpenAI SDK's ResponseStreamEvent, and the stream accumulated by the SDK's own
ResponseStreamState (what client.responses.stream uses) compared with the final
response."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai._types import omit
from openai.lib.streaming.responses import ResponseStreamState

from proxy.completion import Accumulator
from proxy.responses.answer import item_id, to_response
from proxy.responses.events import ENDED_EARLY, Event, StreamTranslator
from proxy.responses.translate import ChatCall

from .fixtures import (
    CREATED,
    RID,
    USAGE,
    call,
    call_delta,
    check_events,
    chunk,
    kinds,
    response,
    run,
    text_chunks,
)

FN = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": True}
FN2 = {"type": "function", "name": "get_time", "parameters": {"type": "object"}, "strict": False}

TEXT_ITEM = [
    "response.output_item.added",
    "response.content_part.added",
]
TEXT_END = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def translator(c: ChatCall | None = None) -> StreamTranslator:
    return StreamTranslator(c or call(stream=True), RID, CREATED, clock=lambda: CREATED + 5)


def sdk_final(c: ChatCall, events: list[Event]) -> Any:
    """The stream run through the SDK's accumulator; its final response."""
    state: ResponseStreamState[Any] = ResponseStreamState(
        input_tools=c.tools or omit,
        text_format=omit,
    )
    for event in check_events(events):
        state.handle_event(event)
    return state._completed_response


def same_as_unstreamed(c: ChatCall, chunks: list[dict[str, Any]], t: StreamTranslator) -> None:
    acc = Accumulator()
    for ch in chunks:
        acc.feed(ch)
    expected = to_response(acc.result(), c, RID, CREATED, completed_at=CREATED + 5)
    assert t.response == expected


def payloads(events: list[Event], kind: str) -> list[dict[str, Any]]:
    return [p for k, p in events if k == kind]


def test_a_text_stream() -> None:
    c = call(stream=True, instructions="Be brief.")
    t = translator(c)
    chunks = [
        *text_chunks("Hel", "", "lo", " world"),
        chunk(finish="stop"),
        chunk(choices=False, usage=USAGE),
    ]
    events = run(t, chunks)
    assert kinds(events) == [
        "response.created",
        "response.in_progress",
        *TEXT_ITEM,
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        *TEXT_END,
        "response.completed",
    ]
    parsed = check_events(events)
    created = parsed[0].response
    assert created.status == "in_progress" and created.output == [] and created.usage is None
    assert created.id == RID and created.instructions == "Be brief."
    deltas = payloads(events, "response.output_text.delta")
    assert "".join(d["delta"] for d in deltas) == "Hello world"
    assert all(d["item_id"] == item_id("msg", RID, 0) for d in deltas)
    assert payloads(events, "response.output_text.done")[0]["text"] == "Hello world"
    final = parsed[-1].response
    assert final.status == "completed" and final.output_text == "Hello world"
    assert (
        final.usage is not None
        and final.usage.input_tokens == 11
        and final.usage.output_tokens == 7
    )
    assert final.model == "backend-model"
    assert events[-1][1]["response"] == t.response
    response(t.response)
    same_as_unstreamed(c, chunks, t)
    sdk = sdk_final(c, events)
    assert sdk.output_text == "Hello world"
    # the SDK's parsed response adds `parsed` to each output_text; the rest is equal
    assert sdk.model_dump(exclude={"output"}) == final.model_dump(exclude={"output"})
    assert [o.id for o in sdk.output] == [o.id for o in final.output]
    assert t.finished
    assert (
        t.on_end() == [] and t.on_chunk(chunk({"content": "late"})) == [] and t.on_error({}) == []
    )


def test_tool_calls_by_index() -> None:
    c = call(stream=True, tools=[FN, FN2])
    t = translator(c)
    chunks = [
        chunk({"role": "assistant"}),
        chunk({"tool_calls": [call_delta(0, "call_a", "get_weather", "")]}),
        chunk({"tool_calls": [call_delta(0, arguments='{"ci')]}),
        chunk({"tool_calls": [call_delta(0, arguments='ty": "Paris"}')]}),
        chunk({"tool_calls": [call_delta(1, "call_b", "get_time", "{")]}),
        chunk({"tool_calls": [call_delta(1, arguments="}")]}),
        chunk(finish="tool_calls"),
        chunk(choices=False, usage=USAGE),
    ]
    events = run(t, chunks)
    call_events = [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert kinds(events) == [
        "response.created",
        "response.in_progress",
        *call_events,
        *call_events[:2],
        *call_events[2:],
        "response.completed",
    ]
    check_events(events)
    added = payloads(events, "response.output_item.added")
    assert [a["item"]["call_id"] for a in added] == ["call_a", "call_b"]
    assert [a["item"]["arguments"] for a in added] == ["", ""]
    assert [a["item"]["status"] for a in added] == ["in_progress", "in_progress"]
    for index, args in ((0, '{"city": "Paris"}'), (1, "{}")):
        deltas = [
            d["delta"]
            for d in payloads(events, "response.function_call_arguments.delta")
            if d["output_index"] == index
        ]
        assert "".join(deltas) == args
        [done] = [
            d
            for d in payloads(events, "response.function_call_arguments.done")
            if d["output_index"] == index
        ]
        assert done["arguments"] == args
        assert done["item_id"] == item_id("fc", RID, index)
    final = response(t.response)
    assert [
        (o.call_id, o.name, o.arguments) for o in final.output if o.type == "function_call"
    ] == [
        ("call_a", "get_weather", '{"city": "Paris"}'),
        ("call_b", "get_time", "{}"),
    ]
    same_as_unstreamed(c, chunks, t)
    sdk = sdk_final(c, events)
    assert sdk.output[0].parsed_arguments == {"city": "Paris"}  # strict: parsed by the SDK
    assert sdk.output[1].parsed_arguments is None
    assert sdk.model_dump(exclude={"output"}) == final.model_dump(exclude={"output"})


def test_text_then_a_tool_call_then_text() -> None:
    c = call(stream=True, tools=[FN])
    t = translator(c)
    chunks = [
        *text_chunks("Checking", "..."),
        chunk({"tool_calls": [call_delta(0, "call_1", "get_weather", '{"city":"Oslo"}')]}),
        chunk({"content": "Done."}),
        chunk(finish="tool_calls"),
    ]
    events = run(t, chunks)
    check_events(events)
    final = response(t.response)
    assert [o.type for o in final.output] == ["message", "function_call", "message"]
    assert [o.id for o in final.output] == [
        item_id("msg", RID, 0),
        item_id("fc", RID, 1),
        item_id("msg", RID, 2),
    ]
    assert final.output_text == "Checking...Done."
    assert final.usage is None
    # each item done before the next is added
    opened: list[int] = []
    for kind, payload in events:
        if kind == "response.output_item.added":
            opened.append(payload["output_index"])
        elif kind == "response.output_item.done":
            assert opened[-1] == payload["output_index"]
    assert sdk_final(c, events).output_text == "Checking...Done."


def test_full_tool_calls_in_one_chunk_as_ollama_sends_them() -> None:
    c = call(stream=True, tools=[FN, FN2])
    t = translator(c)
    chunks = [
        chunk(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_x",
                        "index": 0,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                    },
                    {
                        "id": "call_y",
                        "index": 1,
                        "type": "function",
                        "function": {"name": "get_time", "arguments": "{}"},
                    },
                ],
            }
        ),
        chunk(
            finish="tool_calls",
            usage={"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14},
        ),
    ]
    events = run(t, chunks)
    check_events(events)
    final = response(t.response)
    assert [o.arguments for o in final.output if o.type == "function_call"] == [
        '{"city":"Rome"}',
        "{}",
    ]
    assert final.usage is not None and final.usage.total_tokens == 14
    same_as_unstreamed(c, chunks, t)


def test_tool_calls_without_index_or_id() -> None:
    c = call(stream=True, tools=[FN, FN2])
    t = translator(c)
    chunks = [
        chunk(
            {"tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": "{"}}]}
        ),
        chunk({"tool_calls": [{"function": {"arguments": "}"}}]}),
        chunk({"tool_calls": [{"id": "c2", "function": {"name": "get_time"}}]}),
        chunk(finish="tool_calls"),
    ]
    events = run(t, chunks)
    check_events(events)
    final = response(t.response)
    assert [(o.call_id, o.arguments) for o in final.output if o.type == "function_call"] == [
        ("c1", "{}"),
        ("c2", ""),
    ]


def test_a_tool_call_waits_for_its_name() -> None:
    c = call(stream=True, tools=[FN])
    t = translator(c)
    events = run(
        t,
        [
            chunk({"tool_calls": [call_delta(0, "call_1", None, '{"a"')]}),
            chunk({"tool_calls": [call_delta(0, name="get_weather", arguments=":1}")]}),
            chunk(finish="tool_calls"),
        ],
    )
    check_events(events)
    [added] = payloads(events, "response.output_item.added")
    assert added["item"]["name"] == "get_weather"
    assert (
        "".join(d["delta"] for d in payloads(events, "response.function_call_arguments.delta"))
        == '{"a":1}'
    )


def test_a_tool_call_id_the_backend_left_out_is_made_up() -> None:
    t = translator(call(stream=True, tools=[FN]))
    events = run(
        t,
        [
            chunk({"tool_calls": [call_delta(0, None, "get_weather", "{}")]}),
            chunk(finish="tool_calls"),
        ],
    )
    check_events(events)
    assert t.response["output"][0]["call_id"] == item_id("call", RID, 0)


@pytest.mark.parametrize(
    ("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")]
)
def test_cut_short_is_response_incomplete(finish: str, reason: str) -> None:
    c = call(stream=True, max_output_tokens=16)
    t = translator(c)
    chunks = [
        *text_chunks("Once", " upon"),
        chunk(finish=finish),
        chunk(choices=False, usage=USAGE),
    ]
    events = run(t, chunks)
    parsed = check_events(events)
    assert kinds(events)[-1] == "response.incomplete"
    final = parsed[-1].response
    assert final.status == "incomplete"
    assert final.incomplete_details is not None and final.incomplete_details.reason == reason
    assert final.output[0].status == "incomplete"
    assert payloads(events, "response.output_item.done")[0]["item"]["status"] == "incomplete"
    assert final.usage is not None and final.usage.output_tokens == 7
    assert events[-1][1]["response"] == t.response
    same_as_unstreamed(c, chunks, t)
    sdk_final(c, events)  # the SDK accumulates it without complaint


def test_a_backend_error_mid_stream_is_response_failed() -> None:
    c = call(stream=True)
    t = translator(c)
    events = run(t, text_chunks("Hal", "f"), end=False)
    events += t.on_error(
        {"error": {"message": "CUDA out of memory", "type": "server_error", "code": None}}
    )
    parsed = check_events(events)
    assert kinds(events)[-3:] == [
        "response.output_text.delta",
        "response.output_text.delta",
        "response.failed",
    ]
    final = parsed[-1].response
    assert final.status == "failed"
    assert final.error is not None
    assert (final.error.code, final.error.message) == ("server_error", "CUDA out of memory")
    assert final.output[0].status == "incomplete"
    assert final.output_text == "Half"
    assert events[-1][1]["response"] == t.response
    assert t.on_end() == [] and t.on_error({}) == []
    sdk_final(c, events)


def test_an_error_chunk_is_an_error() -> None:
    t = translator()
    events = run(
        t,
        [
            *text_chunks("a"),
            {"error": {"message": "Too many requests", "type": "rate_limit_error"}},
        ],
    )
    check_events(events)
    assert events[-1][1]["response"]["error"] == {
        "code": "rate_limit_exceeded",
        "message": "Too many requests",
    }


def test_a_stream_ending_without_a_finish_is_response_failed() -> None:
    t = translator()
    events = run(t, text_chunks("Hal"))
    parsed = check_events(events)
    assert kinds(events)[-1] == "response.failed"
    assert parsed[-1].response.error.code == "server_error"
    assert parsed[-1].response.error.message == ENDED_EARLY


def test_an_empty_stream() -> None:
    t = translator(call(stream=True, model="asked"))
    events = t.on_end()
    check_events(events)
    assert kinds(events) == ["response.created", "response.in_progress", "response.failed"]
    assert events[0][1]["response"]["model"] == "asked"


def test_start_sends_the_first_events_before_the_backend_answers() -> None:
    t = translator(call(stream=True, model="asked"))
    first = t.start()
    assert kinds(first) == ["response.created", "response.in_progress"]
    assert first[0][1]["response"]["model"] == "asked"
    assert t.start() == []
    rest = run(t, [*text_chunks("x"), chunk(finish="stop")])
    check_events(first + rest)
    assert t.response["model"] == "backend-model"


def test_an_answer_without_text_or_calls_has_an_empty_message() -> None:
    c = call(stream=True)
    t = translator(c)
    chunks = [chunk({"role": "assistant", "content": ""}), chunk(finish="stop")]
    events = run(t, chunks)
    check_events(events)
    assert kinds(events) == [
        "response.created",
        "response.in_progress",
        *TEXT_ITEM,
        *TEXT_END,
        "response.completed",
    ]
    same_as_unstreamed(c, chunks, t)
    assert sdk_final(c, events).output_text == ""


def test_other_choices_are_ignored() -> None:
    t = translator()
    chunks = [*text_chunks("a"), chunk({"content": "zzz"}, index=1), chunk(finish="stop")]
    events = run(t, chunks)
    check_events(events)
    assert t.response["output"][0]["content"][0]["text"] == "a"


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_reasoning_then_text(key: str) -> None:
    c = call(stream=True)
    t = translator(c)
    chunks = [
        chunk({"role": "assistant", key: "Let me"}),
        chunk({key: " think."}),
        chunk({"content": "42"}),
        chunk(finish="stop"),
    ]
    events = run(t, chunks)
    check_events(events)
    assert kinds(events)[2:-1] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        *TEXT_ITEM,
        "response.output_text.delta",
        *TEXT_END,
    ]
    final = response(t.response)
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == "Let me think."
    assert final.output_text == "42"
    doc = {
        "model": "backend-model",
        "choices": [
            {
                "index": 0,
                "message": {"content": "42", key: "Let me think."},
                "finish_reason": "stop",
            }
        ],
    }
    assert t.response == to_response(doc, c, RID, CREATED, completed_at=CREATED + 5)
    assert sdk_final(c, events).output_text == "42"


def test_a_refusal() -> None:
    c = call(stream=True)
    t = translator(c)
    events = run(
        t,
        [
            chunk({"role": "assistant", "refusal": "I can't"}),
            chunk({"refusal": " do that."}),
            chunk(finish="stop"),
        ],
    )
    check_events(events)
    assert kinds(events)[2:-1] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.refusal.delta",
        "response.refusal.delta",
        "response.refusal.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert payloads(events, "response.refusal.done")[0]["refusal"] == "I can't do that."
    doc = {
        "model": "backend-model",
        "choices": [
            {
                "index": 0,
                "message": {"content": None, "refusal": "I can't do that."},
                "finish_reason": "stop",
            }
        ],
    }
    assert t.response == to_response(doc, c, RID, CREATED, completed_at=CREATED + 5)
    sdk_final(c, events)


def test_logprobs_in_the_stream() -> None:
    c = call(stream=True, include=["message.output_text.logprobs"], top_logprobs=1)
    t = translator(c)

    def lp(token: str, value: float) -> dict[str, Any]:
        return {
            "content": [
                {
                    "token": token,
                    "logprob": value,
                    "bytes": list(token.encode()),
                    "top_logprobs": [{"token": token, "logprob": value}],
                }
            ]
        }

    chunks = [
        chunk({"role": "assistant", "content": "Hi"}, logprobs=lp("Hi", -0.5)),
        chunk({"content": "!"}, logprobs=lp("!", -0.25)),
        chunk(finish="stop"),
    ]
    events = run(t, chunks)
    check_events(events)
    deltas = payloads(events, "response.output_text.delta")
    assert [d["logprobs"] for d in deltas] == [
        [{"token": "Hi", "logprob": -0.5, "top_logprobs": [{"token": "Hi", "logprob": -0.5}]}],
        [{"token": "!", "logprob": -0.25, "top_logprobs": [{"token": "!", "logprob": -0.25}]}],
    ]
    assert len(payloads(events, "response.output_text.done")[0]["logprobs"]) == 2
    part = response(t.response).output[0].content[0]
    assert part.type == "output_text" and part.logprobs is not None
    assert [(x.token, x.bytes) for x in part.logprobs] == [("Hi", [72, 105]), ("!", [33])]


def test_arguments_as_an_object() -> None:
    t = translator(call(stream=True, tools=[FN]))
    events = run(
        t,
        [
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "c",
                            "function": {"name": "get_weather", "arguments": {"city": "Bern"}},
                        }
                    ]
                }
            ),
            chunk(finish="tool_calls"),
        ],
    )
    check_events(events)
    assert json.loads(t.response["output"][0]["arguments"]) == {"city": "Bern"}


def test_messages_after_the_stream() -> None:
    c = call(stream=True, tools=[FN])
    t = translator(c)
    run(
        t,
        [
            *text_chunks("Ok."),
            chunk({"tool_calls": [call_delta(0, None, "get_weather", "{}")]}),
            chunk(finish="tool_calls"),
        ],
    )
    assert t.messages_after() == [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "Ok.",
            "tool_calls": [
                {
                    "id": item_id("call", RID, 1),
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
    ]


def test_response_before_the_end_is_the_answer_so_far() -> None:
    t = translator()
    run(t, text_chunks("par", "tial"), end=False)
    so_far = t.response
    assert so_far["status"] == "in_progress"
    assert so_far["output"][0]["content"][0]["text"] == "partial"
    assert not t.finished


def test_arguments_for_a_call_already_closed_still_reach_the_final_response() -> None:
    """No known backend interleaves tool calls; if one did, nothing is lost."""
    c = call(stream=True, tools=[FN, FN2])
    t = translator(c)
    events = run(
        t,
        [
            chunk({"tool_calls": [call_delta(0, "call_a", "get_weather", "{")]}),
            chunk({"tool_calls": [call_delta(1, "call_b", "get_time", "{}")]}),
            chunk({"tool_calls": [call_delta(0, arguments="}")]}),
            chunk(finish="tool_calls"),
        ],
    )
    check_events(events)
    assert [o["arguments"] for o in t.response["output"]] == ["{}", "{}"]
    first = [
        p["delta"]
        for p in payloads(events, "response.function_call_arguments.delta")
        if p["output_index"] == 0
    ]
    assert "".join(first) == "{}"
    sdk_final(c, events)
