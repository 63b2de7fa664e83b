"""Chat completions as Response objects, checked against the OpenAI SDK's Response."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.responses.answer import (
    item_id,
    messages_after,
    new_response_id,
    response_error,
    to_response,
)

from .fixtures import CREATED, RID, USAGE, call, completion, response, tool_call

FN = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": True}
FN2 = {"type": "function", "name": "get_time", "parameters": {"type": "object"}}


def test_a_text_answer() -> None:
    c = call(instructions="Be brief.", metadata={"k": "v"}, temperature=0.5, max_output_tokens=100)
    doc = to_response(
        completion("Hello there.", usage=USAGE), c, RID, CREATED, completed_at=CREATED + 2
    )
    r = response(doc)
    assert r.id == RID
    assert r.object == "response"
    assert r.created_at == CREATED and r.completed_at == CREATED + 2
    assert r.status == "completed"
    assert r.error is None and r.incomplete_details is None
    assert r.model == "backend-model"
    assert len(r.output) == 1
    msg = r.output[0]
    assert msg.type == "message" and msg.role == "assistant" and msg.status == "completed"
    assert msg.id == item_id("msg", RID, 0) and msg.id.startswith("msg_")
    assert msg.content[0].type == "output_text"
    assert msg.content[0].text == "Hello there."
    assert msg.content[0].annotations == []
    assert r.output_text == "Hello there."
    assert r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (11, 7, 18)
    assert r.usage.input_tokens_details.cached_tokens == 4
    assert r.usage.output_tokens_details.reasoning_tokens == 2
    # the echo
    assert r.instructions == "Be brief."
    assert r.metadata == {"k": "v"}
    assert r.temperature == 0.5 and r.top_p is None
    assert r.max_output_tokens == 100
    assert r.tool_choice == "auto" and r.tools == []
    assert r.parallel_tool_calls is True
    assert r.truncation == "disabled"
    assert r.text is not None and r.text.format is not None and r.text.format.type == "text"
    assert r.previous_response_id is None and r.user is None
    assert doc["store"] is True
    # output_text is the SDK's property, not a field of the object
    assert "output_text" not in doc and "output_text" not in r.model_dump()


def test_response_ids() -> None:
    rid = new_response_id()
    assert rid.startswith("resp_") and len(rid) == 53
    int(rid[5:], 16)
    assert new_response_id() != rid
    assert item_id("fc", "resp_abc", 2) == "fc_abc0002"


@pytest.mark.parametrize(
    ("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")]
)
def test_cut_short_is_incomplete(finish: str, reason: str) -> None:
    doc = to_response(
        completion("Once upon a", finish=finish), call(max_output_tokens=16), RID, CREATED
    )
    r = response(doc)
    assert r.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == reason
    assert r.output[0].status == "incomplete"
    assert r.output_text == "Once upon a"
    assert r.completed_at is None and "completed_at" not in doc


@pytest.mark.parametrize("finish", ["stop", "tool_calls", "function_call", None])
def test_other_finishes_are_completed(finish: str | None) -> None:
    assert (
        to_response(completion("x", finish=finish), call(), RID, CREATED)["status"] == "completed"
    )


def test_tool_calls() -> None:
    c = call(tools=[FN, FN2], tool_choice="required", parallel_tool_calls=True)
    doc = to_response(
        completion(
            None,
            finish="tool_calls",
            tool_calls=[
                tool_call("call_a", "get_weather", '{"city":"Paris"}'),
                tool_call("call_b", "get_time", "{}"),
            ],
        ),
        c,
        RID,
        CREATED,
    )
    r = response(doc)
    assert [o.type for o in r.output] == ["function_call", "function_call"]
    first, second = r.output
    assert first.type == "function_call" and second.type == "function_call"
    assert (first.call_id, first.name, first.arguments) == (
        "call_a",
        "get_weather",
        '{"city":"Paris"}',
    )
    assert (second.call_id, second.name, second.arguments) == ("call_b", "get_time", "{}")
    assert first.id == item_id("fc", RID, 0) and second.id == item_id("fc", RID, 1)
    assert first.status == second.status == "completed"
    assert r.output_text == ""
    assert r.tool_choice == "required"
    assert [t.name for t in r.tools if t.type == "function"] == ["get_weather", "get_time"]


def test_text_then_tool_calls() -> None:
    doc = to_response(
        completion(
            "Let me check.",
            finish="tool_calls",
            tool_calls=[tool_call("call_1", "get_weather", "{}")],
        ),
        call(tools=[FN]),
        RID,
        CREATED,
    )
    r = response(doc)
    assert [o.type for o in r.output] == ["message", "function_call"]
    assert r.output_text == "Let me check."


def test_tool_call_without_an_id_or_with_object_arguments() -> None:
    doc = to_response(
        completion(
            "",
            finish="tool_calls",
            tool_calls=[{"function": {"name": "get_weather", "arguments": {"city": "Ümeå"}}}],
        ),
        call(tools=[FN]),
        RID,
        CREATED,
    )
    r = response(doc)
    [fc] = r.output
    assert fc.type == "function_call"
    assert fc.call_id == item_id("call", RID, 0)
    assert json.loads(fc.arguments) == {"city": "Ümeå"}


def test_legacy_function_call() -> None:
    doc = to_response(
        completion(
            None, finish="function_call", function_call={"name": "get_weather", "arguments": "{}"}
        ),
        call(tools=[FN]),
        RID,
        CREATED,
    )
    [fc] = response(doc).output
    assert fc.type == "function_call" and fc.name == "get_weather"


def test_refusal() -> None:
    r = response(
        to_response(completion(None, refusal="I can't help with that."), call(), RID, CREATED)
    )
    [msg] = r.output
    assert msg.type == "message"
    [part] = msg.content
    assert part.type == "refusal" and part.refusal == "I can't help with that."
    assert r.output_text == ""


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_reasoning_text_becomes_a_reasoning_item(key: str) -> None:
    r = response(to_response(completion("42.", **{key: "Six times seven."}), call(), RID, CREATED))
    assert [o.type for o in r.output] == ["reasoning", "message"]
    rs = r.output[0]
    assert rs.type == "reasoning" and rs.id == item_id("rs", RID, 0)
    assert rs.summary == []
    assert rs.content is not None and rs.content[0].text == "Six times seven."
    assert r.output[1].id == item_id("msg", RID, 1)
    assert r.output_text == "42."


@pytest.mark.parametrize("content", ["", None])
def test_an_empty_answer_still_has_a_message(content: str | None) -> None:
    r = response(to_response(completion(content), call(), RID, CREATED))
    [msg] = r.output
    assert msg.type == "message" and msg.content[0].type == "output_text"
    assert msg.content[0].text == ""


def test_content_as_text_parts() -> None:
    r = response(
        to_response(
            completion([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]),
            call(),
            RID,
            CREATED,
        )
    )
    assert r.output_text == "ab"


def test_no_usage_is_null_usage() -> None:
    assert response(to_response(completion("x"), call(), RID, CREATED)).usage is None


def test_usage_without_details() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 5}
    r = response(to_response(completion("x", usage=usage), call(), RID, CREATED))
    assert r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (3, 5, 8)
    assert r.usage.input_tokens_details.cached_tokens == 0
    assert r.usage.output_tokens_details.reasoning_tokens == 0


def test_logprobs_when_included() -> None:
    logprobs = {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.1,
                "bytes": [72, 105],
                "top_logprobs": [
                    {"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},
                    {"token": "Yo", "logprob": -2.5},
                ],
            },
            {"token": "!", "logprob": -0.3, "top_logprobs": []},
        ]
    }
    doc = completion("Hi!")
    doc["choices"][0]["logprobs"] = logprobs
    r = response(
        to_response(
            doc, call(include=["message.output_text.logprobs"], top_logprobs=2), RID, CREATED
        )
    )
    part = r.output[0].content[0]
    assert part.type == "output_text" and part.logprobs is not None
    assert [lp.token for lp in part.logprobs] == ["Hi", "!"]
    assert part.logprobs[0].bytes == [72, 105]
    assert part.logprobs[1].bytes == [33]
    assert [t.token for t in part.logprobs[0].top_logprobs] == ["Hi", "Yo"]
    assert part.logprobs[0].top_logprobs[1].bytes == list(b"Yo")
    assert r.top_logprobs == 2
    # not asked for: none given
    plain = response(to_response(doc, call(top_logprobs=2), RID, CREATED))
    assert plain.output[0].content[0].logprobs == []


def test_the_echo_of_every_request_setting() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    c = call(
        tools=[FN, FN2],
        tool_choice={
            "type": "allowed_tools",
            "mode": "auto",
            "tools": [{"type": "function", "name": "get_time"}],
        },
        text={
            "format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True},
            "verbosity": "low",
        },
        top_p=0.8,
        user="u",
        safety_identifier="s",
        prompt_cache_key="k",
        previous_response_id="resp_0",
        store=False,
        truncation="auto",
        reasoning={"effort": "low"},
        max_tool_calls=2,
    )
    doc = to_response(completion('{"a": 1}'), c, RID, CREATED)
    r = response(doc)
    assert r.tool_choice.type == "allowed_tools"
    assert r.text is not None and r.text.format is not None
    assert r.text.format.type == "json_schema" and r.text.format.name == "thing"
    assert r.text.verbosity == "low"
    assert (r.top_p, r.user, r.safety_identifier, r.prompt_cache_key) == (0.8, "u", "s", "k")
    assert r.previous_response_id == "resp_0"
    assert doc["store"] is False
    assert r.truncation == "auto"
    assert r.reasoning is not None and r.reasoning.effort == "low"
    assert r.max_tool_calls == 2
    assert r.output_text == '{"a": 1}'


def test_the_model_falls_back_to_the_requests() -> None:
    doc = completion("x")
    del doc["model"]
    assert to_response(doc, call(model="asked"), RID, CREATED)["model"] == "asked"


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (
            {"error": {"message": "boom", "type": "server_error", "code": None}},
            "server_error",
            "boom",
        ),
        ({"message": "slow down", "type": "rate_limit_error"}, "rate_limit_exceeded", "slow down"),
        ({"error": {"message": "bad", "code": "invalid_prompt"}}, "invalid_prompt", "bad"),
        ({"error": "text only"}, "server_error", "text only"),
        ({}, "server_error", "The backend reported an error."),
    ],
)
def test_backend_errors_as_response_errors(error: dict[str, Any], code: str, message: str) -> None:
    assert response_error(error) == {"code": code, "message": message}


def test_messages_after_from_a_completion() -> None:
    c = call(tools=[FN])
    done = completion(
        "Sure.", finish="tool_calls", tool_calls=[tool_call("call_1", "get_weather", "{}")]
    )
    assert messages_after(c, done) == [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "Sure.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
    ]
    assert messages_after(c, done) == messages_after(c, to_response(done, c, RID, CREATED))
