"""The Responses API (POST /v1/responses, GET and DELETE /v1/responses/{id}) through
the proxy to the real llama.cpp server (llama-cpp-python's, which speaks Chat
Completions only, so every request goes the `responses: translate` way), as the
OpenAI Python SDK, the OpenAI Node SDK and the OpenAI Agents SDK use it.

The tiny random model never stops by itself (see llama_model.py): every plain answer
runs to `max_output_tokens` and is `incomplete` with reason max_output_tokens; an
answer is `completed` when a keyword rule turns it into a function call. At
temperature 0 llama answers the same messages with the same text, so what the proxy
sent llama is checked by asking llama the chat request the translation should have
made, directly.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

try:
    from .llama_server import LlamaBackend
except ImportError:
    from llama_server import LlamaBackend

from tests.fixtures import ProxyFactory

NodeSDK = Any  # the `node_sdk` fixture (tests/e2e/conftest.py)
KEY = "sk-resp-0123456789abcdef"
OTHER = "sk-resp-other-0123456789"
ENV = {"RESP_KEY": KEY, "RESP_OTHER": OTHER}
MAX = 8  # max_output_tokens: the tiny model always uses them all
WORD = re.compile(r"[A-Za-z]+")
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)

CHAIN = """
upstreams:
  - name: llama
    url: {llama}
    timeouts: {connect: 5, first_byte: 30, idle: 30}
middleware:
  - type: auth
    keys:
      - {id: main, key: "${RESP_KEY}"}
      - {id: other, key: "${RESP_OTHER}"}
  - type: validate
  - type: session
"""

# a rule that fires on any word the model says, its first word the argument
LOOKUP = {
    "type": "function",
    "name": "lookup",
    "description": "Look a word up.",
    "parameters": {
        "type": "object",
        "properties": {"word": {"type": "string"}},
        "required": ["word"],
        "additionalProperties": False,
    },
}
KEYWORDS = (
    CHAIN
    + """
  - type: tool_keywords
    rules:
      - tool: lookup
        pattern: '(?P<w>[A-Za-z]+)'
        arguments: {word: "{w}"}
"""
)


def sdk(client: Any, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=key, max_retries=0)


async def direct(backend: LlamaBackend, messages: list[dict[str, Any]], **extra: Any) -> Any:
    """llama's chat.completion for these messages, asked without the proxy."""
    body = {"model": backend.model, "messages": messages, "temperature": 0, **extra}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.post(f"{backend.base_url}/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def direct_text(backend: LlamaBackend, messages: list[dict[str, Any]]) -> str:
    doc = await direct(backend, messages, max_tokens=MAX)
    text: str = doc["choices"][0]["message"]["content"]
    return text


def validated(response: Response) -> Response:
    """The Response validated strictly against the SDK's type (the SDK itself only
    constructs, without validating)."""
    return Response.model_validate(response.model_dump(mode="json", exclude_unset=True))


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


# -- the Python SDK --------------------------------------------------------------------


async def test_create_is_a_response_of_llamas_answer(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend
) -> None:
    client = await llama_proxy(CHAIN, ENV)
    api = sdk(client)
    raw = await api.responses.with_raw_response.create(
        model=llama_backend.model,
        input="Tell me about the proxy.",
        max_output_tokens=MAX,
        temperature=0,
        metadata={"case": "plain"},
    )
    response = validated(raw.parse())
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.model == llama_backend.model
    assert response.output_text
    assert response.output_text == await direct_text(
        llama_backend, [user("Tell me about the proxy.")]
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    [item] = response.output
    assert item.type == "message" and item.role == "assistant"
    assert item.status == "incomplete"
    assert response.usage is not None
    assert response.usage.input_tokens > 0
    assert response.usage.output_tokens == MAX
    assert response.usage.total_tokens == response.usage.input_tokens + MAX
    assert (response.max_output_tokens, response.temperature) == (MAX, 0)
    assert response.metadata == {"case": "plain"}
    assert raw.headers["x-session-id"].startswith("sess_")
    await api.close()


async def test_stream_events_parse_in_sequence_and_add_up_to_the_response(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend
) -> None:
    client = await llama_proxy(CHAIN, ENV)
    api = sdk(client)
    prompt = "Tell me a story."
    events: list[Any] = []
    async with api.responses.stream(
        model=llama_backend.model, input=prompt, max_output_tokens=MAX, temperature=0
    ) as stream:
        async for event in stream:
            events.append(event)
    # the SDK's get_final_response() wants response.completed; an answer cut short
    # ends with response.incomplete (as at OpenAI), which carries the final Response
    final = validated(events[-1].response)
    # each event validates strictly as the SDK's union of stream events
    for event in events:
        parsed = EVENTS.validate_python(event.model_dump(mode="json", exclude_unset=True))
        assert isinstance(event, type(parsed)), event
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * (len(kinds) - 8),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert len(kinds) > 8
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas
    assert final.output_text == deltas
    assert events[-4].text == deltas  # output_text.done
    assert events[-2].item.content[0].text == deltas  # output_item.done
    assert final.id == events[0].response.id
    assert final.status == "incomplete"
    assert final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"
    # the same answer as unstreamed, and as llama's own
    assert deltas == await direct_text(llama_backend, [user(prompt)])
    # llama-cpp-python sends no usage chunk, even asked for one (include_usage)
    assert final.usage is None
    await api.close()


async def test_instructions_lead_the_conversation(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend
) -> None:
    client = await llama_proxy(CHAIN, ENV)
    api = sdk(client)
    plain = await api.responses.create(
        model=llama_backend.model, input="Hello.", max_output_tokens=MAX, temperature=0
    )
    instructed = await api.responses.create(
        model=llama_backend.model,
        input="Hello.",
        instructions="You are a terse pirate.",
        max_output_tokens=MAX,
        temperature=0,
    )
    assert instructed.instructions == "You are a terse pirate."
    assert instructed.output_text == await direct_text(
        llama_backend,
        [{"role": "system", "content": "You are a terse pirate."}, user("Hello.")],
    )
    assert plain.usage is not None and instructed.usage is not None
    assert instructed.usage.input_tokens > plain.usage.input_tokens
    await api.close()


async def test_previous_response_id_continues_then_stored_responses_are_read_and_deleted(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend
) -> None:
    client = await llama_proxy(CHAIN, ENV)
    api = sdk(client)
    params: dict[str, Any] = {
        "model": llama_backend.model,
        "max_output_tokens": MAX,
        "temperature": 0,
    }
    first = await api.responses.with_raw_response.create(
        input="What is a proxy?", instructions="Answer briefly.", **params
    )
    one = first.parse()
    second = await api.responses.with_raw_response.create(
        input="And a reverse proxy?", previous_response_id=one.id, **params
    )
    two = validated(second.parse())
    assert two.output_text
    assert two.previous_response_id == one.id
    # llama got the first turn, its answer and the new input (instructions are not
    # carried over), in the same session
    assert two.output_text == await direct_text(
        llama_backend,
        [
            user("What is a proxy?"),
            {"role": "assistant", "content": one.output_text},
            user("And a reverse proxy?"),
        ],
    )
    assert second.headers["x-session-id"] == first.headers["x-session-id"]
    assert one.usage is not None and two.usage is not None
    assert two.usage.input_tokens > one.usage.input_tokens

    got = validated(await api.responses.retrieve(two.id))
    assert got.model_dump() == two.model_dump()
    # another key sees none of it
    other = sdk(client, OTHER)
    with pytest.raises(openai.NotFoundError):
        await other.responses.retrieve(two.id)
    with pytest.raises(openai.NotFoundError) as foreign:
        await other.responses.create(input="Go on.", previous_response_id=two.id, **params)
    assert foreign.value.code == "previous_response_not_found"

    await api.responses.delete(two.id)
    with pytest.raises(openai.NotFoundError):
        await api.responses.retrieve(two.id)
    with pytest.raises(openai.NotFoundError):
        await api.responses.delete(two.id)
    with pytest.raises(openai.NotFoundError) as gone:
        await api.responses.create(input="Go on.", previous_response_id=two.id, **params)
    assert gone.value.param == "previous_response_id"
    # the first one is still there
    assert (await api.responses.retrieve(one.id)).output_text == one.output_text
    await other.close()
    await api.close()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_keyword_rule_makes_a_function_call_item(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend, stream: bool
) -> None:
    client = await llama_proxy(KEYWORDS, ENV)
    api = sdk(client)
    params: dict[str, Any] = {
        "model": llama_backend.model,
        "input": "Look something up.",
        "tools": [LOOKUP],
        "max_output_tokens": MAX,
        "temperature": 0,
    }
    kinds: list[str] = []
    if stream:
        async with api.responses.stream(**params) as events:
            async for event in events:
                kinds.append(event.type)
            response = validated(await events.get_final_response())
    else:
        response = validated(await api.responses.create(**params))
    # the model's text, then the call the rule made of its first word
    assert [item.type for item in response.output] == ["message", "function_call"]
    text = response.output_text
    first = WORD.search(text)
    assert first is not None
    call = response.output[1]
    assert call.type == "function_call"
    assert call.name == "lookup"
    assert call.call_id
    assert json.loads(call.arguments) == {"word": first.group(0)}
    assert response.status == "completed"  # finish_reason tool_calls
    assert response.incomplete_details is None
    if stream:
        assert kinds[-1] == "response.completed"
        assert "response.function_call_arguments.done" in kinds

    # the function's output goes back; llama answers it in words (tool_choice none:
    # the rule stays quiet)
    after = validated(
        await api.responses.create(
            model=llama_backend.model,
            previous_response_id=response.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "a word"}],
            tools=[LOOKUP],
            tool_choice="none",
            max_output_tokens=MAX,
            temperature=0,
        )
    )
    assert after.output_text
    assert [item.type for item in after.output] == ["message"]
    # llama got the earlier turns, the call as the assistant's tool_calls and the
    # output as a tool message (llama-cpp-python's chatml prompt leaves tool
    # messages out, so only the earlier turns shape its answer)
    chat_tool = {"type": "function", "function": {k: v for k, v in LOOKUP.items() if k != "type"}}
    answered = await direct(
        llama_backend,
        [
            user("Look something up."),
            {
                "role": "assistant",
                "content": text,
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": "lookup", "arguments": call.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": "a word"},
        ],
        tools=[chat_tool],
        tool_choice="none",
        parallel_tool_calls=True,
        max_tokens=MAX,
    )
    assert after.output_text == answered["choices"][0]["message"]["content"]
    await api.close()


async def test_a_json_schema_text_format_goes_to_llama_as_response_format(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend
) -> None:
    client = await llama_proxy(CHAIN, ENV)
    api = sdk(client)
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    }
    fmt: Any = {"type": "json_schema", "name": "place", "schema": schema, "strict": True}
    # llama-cpp-python's server knows response_format types text and json_object
    # only: its request validation refuses json_schema with a 500, which the proxy
    # answers as for chat, a 502 that does not repeat a failing backend's body
    with pytest.raises(openai.InternalServerError) as refused:
        await api.responses.create(
            model=llama_backend.model,
            input="Name a city.",
            text={"format": fmt},
            max_output_tokens=40,
        )
    assert refused.value.status_code == 502
    assert "The backend failed (status 500)" in refused.value.message
    # json_object it does honour, with its JSON grammar: the answer is JSON from its
    # first character, where the plain answer is words
    shaped = await api.responses.create(
        model=llama_backend.model,
        input="Name a city, as JSON.",
        text={"format": {"type": "json_object"}},
        max_output_tokens=MAX,
        temperature=0,
    )
    assert shaped.text.format.type == "json_object"
    assert shaped.output_text.startswith("{")
    plain = await direct_text(llama_backend, [user("Name a city, as JSON.")])
    assert not plain.startswith("{")
    await api.close()


async def test_created_at_is_whole_seconds(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend
) -> None:
    client = await llama_proxy(CHAIN, ENV)
    resp = await client.post(
        "/v1/responses",
        json={"model": llama_backend.model, "input": "Hi", "max_output_tokens": MAX},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert resp.status == 200
    doc = await resp.json()
    assert isinstance(doc["created_at"], int), doc["created_at"]


# -- the Node SDK ----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_node_sdk_responses_create(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend, node_sdk: NodeSDK, stream: bool
) -> None:
    client = await llama_proxy(CHAIN, ENV)
    prompt = "Tell me about the proxy."
    params = {
        "model": llama_backend.model,
        "input": prompt,
        "instructions": "Be brief.",
        "max_output_tokens": MAX,
        "temperature": 0,
        "stream": stream,
    }
    got = await node_sdk.run(str(client.make_url("/v1")), KEY, params, script="responses.mjs")
    assert got["ok"], got
    assert got["status"] == 200
    assert got["headers"]["x-session-id"].startswith("sess_")
    response = Response.model_validate(got["response"])
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.instructions == "Be brief."
    expected = await direct_text(
        llama_backend, [{"role": "system", "content": "Be brief."}, user(prompt)]
    )
    assert got["output_text"] == response.output_text == expected
    if stream:
        assert got["headers"]["content-type"] == "text/event-stream"
        events = got["events"]
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert events[0]["type"] == "response.created"
        assert events[-1]["type"] == "response.incomplete"
    else:
        assert got["events"] is None
        assert response.usage is not None
        assert response.usage.input_tokens > 0 and response.usage.output_tokens == MAX
    # the response is stored: the Python SDK reads what the Node SDK made
    api = sdk(client)
    assert (await api.responses.retrieve(response.id)).output_text == expected
    await api.close()


# -- the Agents SDK ----------------------------------------------------------------------


async def test_an_agent_with_a_function_tool_runs_through_the_proxy(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend
) -> None:
    """The Agents SDK's default model speaks the Responses API. The tiny model calls
    no tool by itself, so the keyword rule makes every answer a call of the agent's
    function tool: stopping on the first tool's output, the run ends with it; running
    the model again after each, it is bounded by max_turns, each turn sending the
    calls and their outputs back as input items."""
    try:
        import agents
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("openai-agents is not installed (pip install -e '.[dev]')")
    client = await llama_proxy(KEYWORDS, ENV)
    api = sdk(client)
    agents.set_default_openai_client(api, use_for_tracing=False)
    agents.set_default_openai_api("responses")
    agents.set_tracing_disabled(True)
    looked_up: list[str] = []

    @agents.function_tool
    def lookup(word: str) -> str:
        """Look a word up."""
        looked_up.append(word)
        return f"{word}: a word"

    settings = agents.ModelSettings(temperature=0, max_tokens=MAX)
    stopping = agents.Agent(
        name="stopper",
        instructions="Look words up.",
        model=llama_backend.model,
        model_settings=settings,
        tools=[lookup],
        tool_use_behavior="stop_on_first_tool",
    )
    result = await agents.Runner.run(stopping, "Look something up.", max_turns=3)
    [word] = looked_up
    assert WORD.fullmatch(word)
    assert result.final_output == f"{word}: a word"
    # its model was the Responses one: each turn's id is a response id
    assert [r.response_id[:5] for r in result.raw_responses] == ["resp_"]

    looping = agents.Agent(
        name="looper",
        instructions="Look words up.",
        model=llama_backend.model,
        model_settings=settings,
        tools=[lookup],
    )
    with pytest.raises(agents.MaxTurnsExceeded):
        await agents.Runner.run(looping, "Look something up.", max_turns=3)
    assert len(looked_up) == 1 + 3
    await api.close()
