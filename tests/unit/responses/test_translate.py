"""Responses requests translated to Chat Completions requests, and the 400s for what
cannot be."""

from __future__ import annotations

from typing import Any

import pytest
from openai.types.responses import ResponseItem
from openai.types.responses.response_create_params import ResponseCreateParamsStreaming
from pydantic import TypeAdapter

from proxy.errors import ProxyError
from proxy.responses.answer import messages_after, to_response
from proxy.responses.translate import HANDLED, to_chat, with_history

from .fixtures import RID, completion, response, tool_call

ITEMS: TypeAdapter[Any] = TypeAdapter(ResponseItem)

FN = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}
FN2 = {"type": "function", "name": "get_time", "parameters": {"type": "object"}}


def refused(body: dict[str, Any], **kw: Any) -> ProxyError:
    with pytest.raises(ProxyError) as info:
        to_chat(body, **kw)
    err = info.value
    assert err.status == 400
    assert err.body()["error"]["type"] == "invalid_request_error"
    return err


def base(**body: Any) -> dict[str, Any]:
    return {"model": "m", "input": "hi", **body}


# --- input --------------------------------------------------------------------------


def test_string_input_is_one_user_message() -> None:
    call = to_chat({"model": "qwen", "input": "Hello there"})
    assert call.body == {"model": "qwen", "messages": [{"role": "user", "content": "Hello there"}]}
    assert call.model == "qwen"
    assert call.stream is False
    assert call.store is True
    assert call.previous_response_id is None
    assert call.metadata == {}
    [item] = call.input_items
    assert item["type"] == "message" and item["role"] == "user"
    assert item["content"] == [{"type": "input_text", "text": "Hello there"}]
    assert item["id"].startswith("msg_")
    ITEMS.validate_python(item)


def test_instructions_come_first_as_a_system_message() -> None:
    call = to_chat(base(instructions="Be brief."))
    assert call.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert call.instructions == "Be brief."
    assert call.messages == [{"role": "user", "content": "hi"}]


def test_message_items_in_every_form() -> None:
    call = to_chat(
        base(
            input=[
                {"role": "developer", "content": "Answer in French."},
                {
                    "type": "message",
                    "role": "system",
                    "content": [{"type": "input_text", "text": "Be kind."}],
                },
                {"role": "user", "content": "Bonjour"},
                {"role": "assistant", "content": "Salut !"},
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "one"},
                        {"type": "input_text", "text": "two"},
                    ],
                },
                {
                    "id": "msg_prev",
                    "type": "message",
                    "role": "assistant",
                    "status": "completed",
                    "content": [
                        {"type": "output_text", "text": "Part A. ", "annotations": []},
                        {"type": "output_text", "text": "Part B.", "annotations": []},
                        {"type": "refusal", "refusal": " No more."},
                    ],
                },
            ]
        )
    )
    assert call.body["messages"] == [
        # developer becomes system; the opening system messages join into one
        {"role": "system", "content": "Answer in French.\n\nBe kind."},
        {"role": "user", "content": "Bonjour"},
        {"role": "assistant", "content": "Salut !"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
        },
        {"role": "assistant", "content": "Part A. Part B. No more."},
    ]
    assert [i["role"] for i in call.input_items] == [
        "developer",
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert call.input_items[3]["content"] == [
        {"type": "output_text", "text": "Salut !", "annotations": []}
    ]
    assert call.input_items[5]["id"] == "msg_prev"
    for item in call.input_items:
        ITEMS.validate_python(item)


def test_instructions_and_a_leading_developer_message_join() -> None:
    call = to_chat(
        base(
            instructions="A.",
            input=[{"role": "developer", "content": "B."}, {"role": "user", "content": "q"}],
        )
    )
    assert call.body["messages"][0] == {"role": "system", "content": "A.\n\nB."}
    assert call.body["messages"][1] == {"role": "user", "content": "q"}


def test_a_later_system_message_stays_where_it_is() -> None:
    call = to_chat(
        base(
            input=[
                {"role": "user", "content": "q"},
                {"role": "developer", "content": "late"},
            ]
        )
    )
    assert call.body["messages"] == [
        {"role": "user", "content": "q"},
        {"role": "system", "content": "late"},
    ]


def test_function_calls_join_one_assistant_message_and_outputs_are_tool_messages() -> None:
    call = to_chat(
        base(
            tools=[FN, FN2],
            input=[
                {"role": "user", "content": "Weather and time in Paris?"},
                {"type": "message", "role": "assistant", "content": "Let me look."},
                {
                    "type": "function_call",
                    "id": "fc_1",
                    "call_id": "call_a",
                    "name": "get_weather",
                    "arguments": '{"city":"Paris"}',
                    "status": "completed",
                },
                {
                    "type": "function_call",
                    "call_id": "call_b",
                    "name": "get_time",
                    "arguments": "{}",
                },
                {"type": "function_call_output", "call_id": "call_a", "output": "18C"},
                {
                    "type": "function_call_output",
                    "call_id": "call_b",
                    "output": [
                        {"type": "input_text", "text": "12:"},
                        {"type": "input_text", "text": "30"},
                    ],
                },
                {
                    "type": "function_call",
                    "call_id": "call_c",
                    "name": "get_time",
                    "arguments": "{}",
                },
            ],
        )
    )
    assert call.body["messages"] == [
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_b", "content": "12:30"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_c",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"},
                }
            ],
        },
    ]
    assert [i["type"] for i in call.input_items] == [
        "message",
        "message",
        "function_call",
        "function_call",
        "function_call_output",
        "function_call_output",
        "function_call",
    ]
    assert call.input_items[2]["id"] == "fc_1"
    for item in call.input_items:
        ITEMS.validate_python(item)


def test_a_previous_responses_output_goes_back_as_input() -> None:
    """store: false clients send the last Response's output items back as input."""
    first = to_chat(base(tools=[FN]))
    prev = response(
        to_response(
            completion(
                "Checking.",
                finish="tool_calls",
                tool_calls=[tool_call("call_1", "get_weather", '{"city":"Oslo"}')],
            ),
            first,
            RID,
            1.0,
        )
    )
    items = [item.model_dump(exclude_none=True) for item in prev.output]
    items.append({"type": "function_call_output", "call_id": "call_1", "output": "-3C"})
    call = to_chat(base(tools=[FN], input=[{"role": "user", "content": "Oslo?"}, *items]))
    assert call.body["messages"][1:] == [
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "-3C"},
    ]


def test_reasoning_items_are_kept_for_storing_and_not_sent() -> None:
    reasoning = {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": "hmm"}],
    }
    call = to_chat(
        base(
            input=[
                {"role": "user", "content": "q"},
                reasoning,
                {"role": "assistant", "content": "a"},
            ]
        )
    )
    assert call.body["messages"] == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    assert call.input_items[1] == reasoning
    ITEMS.validate_python(call.input_items[1])


def test_images_become_image_url_parts() -> None:
    call = to_chat(
        base(
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is this?"},
                        {
                            "type": "input_image",
                            "image_url": "https://x.test/a.png",
                            "detail": "low",
                        },
                        {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                    ],
                }
            ]
        )
    )
    assert call.body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {
                    "type": "image_url",
                    "image_url": {"url": "https://x.test/a.png", "detail": "low"},
                },
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        }
    ]
    ITEMS.validate_python(call.input_items[0])


@pytest.mark.parametrize(
    ("item", "param", "words"),
    [
        ({"type": "item_reference", "id": "msg_1"}, "input[1]", "item_reference"),
        (
            {"type": "web_search_call", "id": "ws_1", "status": "completed"},
            "input[1]",
            "web search",
        ),
        (
            {"type": "computer_call_output", "call_id": "c", "output": {}},
            "input[1]",
            "computer use",
        ),
        ({"type": "mcp_call", "id": "m"}, "input[1]", "MCP"),
        (
            {"type": "custom_tool_call", "call_id": "c", "name": "x", "input": ""},
            "input[1]",
            "custom",
        ),
        ({"type": "frobnicate"}, "input[1].type", "'frobnicate'"),
        ({"content": "no role, no type"}, "input[1].type", "type"),
        (
            {"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]},
            "input[1].content[0]",
            "file",
        ),
        (
            {
                "role": "user",
                "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
            },
            "input[1].content[0]",
            "audio",
        ),
        (
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "a"},
                    {"type": "input_image", "file_id": "file-1", "detail": "auto"},
                ],
            },
            "input[1].content[1].file_id",
            "files API",
        ),
        (
            {"role": "user", "content": [{"type": "input_image", "detail": "auto"}]},
            "input[1].content[0].image_url",
            "image_url",
        ),
        (
            {
                "role": "system",
                "content": [{"type": "input_image", "image_url": "https://x.test/a.png"}],
            },
            "input[1].content[0]",
            "user messages",
        ),
        ({"role": "user", "content": [{"type": "video"}]}, "input[1].content[0].type", "'video'"),
        (
            {"role": "user", "content": [{"type": "output_text", "text": "x"}]},
            "input[1].content[0].type",
            "assistant",
        ),
        ({"role": "tool", "content": "x"}, "input[1].role", "one of"),
        ({"role": "user"}, "input[1].content", "content"),
        ({"type": "function_call", "name": "f", "arguments": "{}"}, "input[1].call_id", "call_id"),
        ({"type": "function_call_output", "output": "x"}, "input[1].call_id", "call_id"),
        (
            {
                "type": "function_call_output",
                "call_id": "c",
                "output": [{"type": "input_image", "image_url": "u"}],
            },
            "input[1].output[0]",
            "text only",
        ),
    ],
)
def test_input_that_cannot_be_translated_is_refused(
    item: dict[str, Any], param: str, words: str
) -> None:
    err = refused(base(input=[{"role": "user", "content": "q"}, item]))
    assert err.param == param
    assert words in err.message
    assert err.code in ("unsupported_input", "missing_required_parameter", "invalid_value")


def test_unsupported_input_names_the_item_with_code_unsupported_input() -> None:
    err = refused(
        base(
            input=[
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "user", "content": "c"},
                {
                    "role": "user",
                    "content": [{"type": "input_file", "file_data": "x", "filename": "a.pdf"}],
                },
            ]
        )
    )
    assert (err.param, err.code) == ("input[3].content[0]", "unsupported_input")
    assert "input[3].content[0]" in err.message


def test_input_is_required_unless_continuing() -> None:
    err = refused({"model": "m"})
    assert (err.param, err.code) == ("input", "missing_required_parameter")
    call = to_chat({"model": "m", "previous_response_id": "resp_1"})
    assert call.body["messages"] == [] and call.input_items == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": 5}, "input"),
        ({"input": ["x"]}, "input[0]"),
        ({"model": 3}, "model"),
        ({"instructions": ["a"]}, "instructions"),
        ({"stream": "yes"}, "stream"),
        ({"store": 1}, "store"),
        ({"metadata": {"k": 1}}, "metadata.k"),
        ({"metadata": []}, "metadata"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": 2.0}, "max_output_tokens"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"truncation": "sometimes"}, "truncation"),
        ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
        ({"include": ["everything"]}, "include[0]"),
        ({"include": "message.output_text.logprobs"}, "include"),
        ({"reasoning": "high"}, "reasoning"),
        ({"stream_options": {"include_obfuscation": False}}, "stream_options"),
        ({"text": {"verbosity": "loud"}}, "text.verbosity"),
    ],
)
def test_values_of_the_wrong_type_or_range(body: dict[str, Any], param: str) -> None:
    err = refused(base(**body))
    assert err.param == param
    assert err.code in ("invalid_type", "invalid_value")


# --- tools --------------------------------------------------------------------------


def test_function_tools_become_chat_tools() -> None:
    call = to_chat(base(tools=[FN, FN2]))
    assert call.body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": FN["parameters"],
                "strict": True,
            },
        },
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    ]
    assert call.body["tool_choice"] == "auto"
    assert call.body["parallel_tool_calls"] is True
    assert call.tool_names == {"get_weather", "get_time"}
    assert call.tools[1] == {
        "type": "function",
        "name": "get_time",
        "description": None,
        "parameters": {"type": "object"},
        "strict": None,
    }


def test_no_tools_no_tool_fields() -> None:
    body = to_chat(base(tools=[], tool_choice="auto", parallel_tool_calls=False)).body
    assert "tools" not in body and "tool_choice" not in body and "parallel_tool_calls" not in body


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("web_search", "web search"),
        ("web_search_preview", "web search"),
        ("file_search", "file search"),
        ("code_interpreter", "code interpreter"),
        ("computer_use_preview", "computer use"),
        ("computer", "computer use"),
        ("mcp", "MCP"),
        ("image_generation", "image generation"),
        ("local_shell", "shell"),
        ("shell", "shell"),
        ("apply_patch", "apply_patch"),
        ("custom", "grammar"),
        ("teleport", "only tools of type 'function'"),
    ],
)
def test_tools_other_than_functions_are_refused(kind: str, words: str) -> None:
    err = refused(base(tools=[FN, {"type": kind, "name": "x"}]))
    assert (err.param, err.code) == ("tools[1].type", "unsupported_tool")
    assert f"'{kind}'" in err.message and "tools[1]" in err.message
    assert words in err.message


def test_a_chat_shaped_tool_is_refused_with_the_flat_shape_named() -> None:
    err = refused(base(tools=[{"type": "function", "function": {"name": "f"}}]))
    assert err.param == "tools[0].name"
    assert "flat" in err.message


@pytest.mark.parametrize(
    ("choice", "chat"),
    [
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        (
            {"type": "function", "name": "get_time"},
            {"type": "function", "function": {"name": "get_time"}},
        ),
    ],
)
def test_tool_choice(choice: Any, chat: Any) -> None:
    call = to_chat(base(tools=[FN, FN2], tool_choice=choice))
    assert call.body["tool_choice"] == chat
    assert call.tool_choice == choice


def test_allowed_tools_filter_the_tools() -> None:
    choice = {
        "type": "allowed_tools",
        "mode": "required",
        "tools": [{"type": "function", "name": "get_time"}],
    }
    call = to_chat(base(tools=[FN, FN2], tool_choice=choice))
    assert call.body["tool_choice"] == "required"
    assert [t["function"]["name"] for t in call.body["tools"]] == ["get_time"]
    assert call.tool_choice == choice


@pytest.mark.parametrize(
    ("choice", "param", "code"),
    [
        ("always", "tool_choice", "invalid_value"),
        ({"type": "function", "name": "nope"}, "tool_choice.name", "invalid_value"),
        ({"type": "function"}, "tool_choice.name", "missing_required_parameter"),
        ({"type": "file_search"}, "tool_choice.type", "unsupported_tool"),
        ({"type": "mcp", "server_label": "x"}, "tool_choice.type", "unsupported_tool"),
        (
            {
                "type": "allowed_tools",
                "mode": "auto",
                "tools": [{"type": "mcp", "server_label": "d"}],
            },
            "tool_choice.tools[0].type",
            "unsupported_tool",
        ),
        (
            {
                "type": "allowed_tools",
                "mode": "auto",
                "tools": [{"type": "function", "name": "zz"}],
            },
            "tool_choice.tools[0].name",
            "invalid_value",
        ),
        (
            {"type": "allowed_tools", "mode": "none", "tools": []},
            "tool_choice.mode",
            "invalid_value",
        ),
    ],
)
def test_bad_tool_choice(choice: Any, param: str, code: str) -> None:
    err = refused(base(tools=[FN], tool_choice=choice))
    assert (err.param, err.code) == (param, code)


def test_required_without_tools_is_refused() -> None:
    err = refused(base(tool_choice="required"))
    assert err.param == "tool_choice"


def test_parallel_tool_calls_false_goes_over() -> None:
    call = to_chat(base(tools=[FN], parallel_tool_calls=False))
    assert call.body["parallel_tool_calls"] is False
    assert call.parallel_tool_calls is False


# --- the other parameters -----------------------------------------------------------


def test_sampling_and_identity_parameters() -> None:
    call = to_chat(
        base(
            max_output_tokens=64,
            temperature=0.2,
            top_p=0.9,
            user="u-1",
            safety_identifier="hash-1",
            prompt_cache_key="ck",
            metadata={"team": "a"},
            store=False,
            previous_response_id="resp_prev",
            truncation="auto",
            max_tool_calls=3,
            service_tier="flex",
            prompt_cache_retention="24h",
        )
    )
    assert call.body == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 64,
        "temperature": 0.2,
        "top_p": 0.9,
        "user": "u-1",
        "safety_identifier": "hash-1",
        "prompt_cache_key": "ck",
    }
    assert call.metadata == {"team": "a"}
    assert call.store is False
    assert call.previous_response_id == "resp_prev"
    assert call.truncation == "auto"
    assert call.max_output_tokens == 64


def test_stream_asks_for_usage() -> None:
    call = to_chat(base(stream=True, stream_options={"include_obfuscation": False}))
    assert call.stream is True
    assert call.body["stream"] is True
    assert call.body["stream_options"] == {"include_usage": True}


def test_text_formats() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    call = to_chat(
        base(
            text={
                "format": {
                    "type": "json_schema",
                    "name": "thing",
                    "schema": schema,
                    "strict": True,
                    "description": "A thing",
                }
            }
        )
    )
    assert call.body["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "thing",
            "schema": schema,
            "strict": True,
            "description": "A thing",
        },
    }
    assert call.text["format"]["name"] == "thing"
    assert to_chat(base(text={"format": {"type": "json_object"}})).body["response_format"] == {
        "type": "json_object"
    }
    plain = to_chat(base(text={"format": {"type": "text"}, "verbosity": "low"}))
    assert "response_format" not in plain.body and "verbosity" not in plain.body
    assert plain.text == {"format": {"type": "text"}, "verbosity": "low"}
    assert to_chat(base()).text == {"format": {"type": "text"}}


@pytest.mark.parametrize(
    ("fmt", "param"),
    [
        ({"type": "json_schema", "schema": {}}, "text.format.name"),
        ({"type": "json_schema", "name": "x"}, "text.format.schema"),
        ({"type": "yaml"}, "text.format.type"),
        ({"name": "x"}, "text.format.type"),
    ],
)
def test_bad_text_format(fmt: dict[str, Any], param: str) -> None:
    assert refused(base(text={"format": fmt})).param == param


def test_logprobs_only_with_include() -> None:
    assert "logprobs" not in to_chat(base(top_logprobs=3)).body
    call = to_chat(base(include=["message.output_text.logprobs"], top_logprobs=3))
    assert call.body["logprobs"] is True and call.body["top_logprobs"] == 3
    assert call.logprobs is True
    assert to_chat(base(include=["message.output_text.logprobs"])).body["top_logprobs"] == 0
    assert "logprobs" not in to_chat(base(include=["reasoning.encrypted_content"])).body


@pytest.mark.parametrize(
    ("effort", "sent"),
    [("low", "low"), ("medium", "medium"), ("high", "high"), ("minimal", None), ("none", None)],
)
def test_reasoning_effort(effort: str, sent: str | None) -> None:
    call = to_chat(base(reasoning={"effort": effort, "summary": "auto"}))
    assert call.body.get("reasoning_effort") == sent
    assert call.reasoning == {"effort": effort, "summary": "auto"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"background": True}, "background"),
        ({"background_options": {"completion_window": "2h"}}, "background_options"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"conversation": {"id": "conv_1"}}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"context_management": [{"type": "compaction"}]}, "context_management"),
        ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
        ({"prompt_cache_options": {"prewarm": True}}, "prompt_cache_options.prewarm"),
    ],
)
def test_unsupported_features(body: dict[str, Any], param: str) -> None:
    err = refused(base(**body))
    assert (err.param, err.code) == (param, "unsupported_parameter")


def test_harmless_settings_are_accepted() -> None:
    call = to_chat(
        base(
            background=False,
            conversation=None,
            prompt=None,
            image={"context_compression": "auto"},
            access_programs={"cyber": "standard"},
            prompt_cache_options={"ttl": "30m"},
            context_management=[],
        )
    )
    assert call.body == {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_unknown_parameters() -> None:
    err = refused(base(top_k=5))
    assert (err.param, err.code, err.message) == (
        "top_k",
        "unknown_parameter",
        "Unknown parameter: 'top_k'.",
    )
    assert to_chat(base(top_k=5), extra_params="allow").body["top_k"] == 5
    assert "top_k" not in to_chat(base(top_k=5), extra_params="drop").body


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("n", "one answer"),
        ("messages", "'input'"),
        ("max_tokens", "max_output_tokens"),
        ("response_format", "text.format"),
    ],
)
def test_chat_parameters_are_refused_with_the_responses_way(key: str, hint: str) -> None:
    for mode in ("reject", "allow", "drop"):
        err = refused(base(**{key: 2}), extra_params=mode)
        assert (err.param, err.code) == (key, "unknown_parameter")
        assert hint in err.message


def test_every_sdk_parameter_is_handled() -> None:
    """No parameter of the SDK's create() is an unknown_parameter here: each is
    translated, kept, ignored or refused with its reason."""
    keys = (
        ResponseCreateParamsStreaming.__required_keys__
        | ResponseCreateParamsStreaming.__optional_keys__
    )
    assert keys - HANDLED == set()


# --- continuing -----------------------------------------------------------------------


def test_with_history_continues_without_the_old_instructions() -> None:
    first = to_chat(
        base(
            instructions="Old.",
            input=[{"role": "developer", "content": "Dev."}, {"role": "user", "content": "q1"}],
        )
    )
    history = messages_after(first, completion("a1"))
    assert history == [
        {"role": "system", "content": "Dev."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
    ]
    second = with_history(
        to_chat(
            {"model": "m", "input": "q2", "instructions": "New.", "previous_response_id": "resp_1"}
        ),
        history,
    )
    assert second.body["messages"] == [
        {"role": "system", "content": "New.\n\nDev."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    assert second.history == history
    third = messages_after(second, completion("a2"))
    assert third == [
        *history,
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]


def test_messages_after_a_tool_call_then_its_output() -> None:
    first = to_chat(base(tools=[FN]))
    answer = to_response(
        completion(
            None,
            finish="tool_calls",
            tool_calls=[tool_call(None, "get_weather", '{"city":"Rome"}')],
        ),
        first,
        RID,
        1.0,
    )
    history = messages_after(first, answer)
    call_id = answer["output"][0]["call_id"]
    assert history[-1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
            }
        ],
    }
    nxt = with_history(
        to_chat(
            {
                "model": "m",
                "tools": [FN],
                "previous_response_id": RID,
                "input": [{"type": "function_call_output", "call_id": call_id, "output": "20C"}],
            }
        ),
        history,
    )
    assert nxt.body["messages"][-2:] == [
        history[-1],
        {"role": "tool", "tool_call_id": call_id, "content": "20C"},
    ]


def test_translated_bodies_pass_the_proxys_chat_validation() -> None:
    from proxy.middleware.validate import ValidateOptions, validate_body

    bodies = [
        base(),
        base(
            instructions="x",
            tools=[FN, FN2],
            tool_choice={"type": "function", "name": "get_time"},
            max_output_tokens=50,
            temperature=1,
            top_p=0.5,
            text={"format": {"type": "json_schema", "name": "t", "schema": {"type": "object"}}},
            include=["message.output_text.logprobs"],
            top_logprobs=5,
            user="u",
            safety_identifier="s",
            prompt_cache_key="k",
            reasoning={"effort": "high"},
            stream=True,
        ),
        base(
            tools=[FN],
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "a"},
                        {"type": "input_image", "image_url": "https://x.test/i.png"},
                    ],
                },
                {"type": "function_call", "call_id": "c", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c", "output": "ok"},
            ],
        ),
    ]
    for body in bodies:
        assert validate_body(to_chat(body).body, ValidateOptions()) == []
