"""The Responses API through the proxy, as the OpenAI Python SDK sees it, in front of
a backend that speaks only Chat Completions (a stand-in recording what it got)."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from aiohttp import web

from tests.fixtures import DONE, Backend, ProxyFactory, chunk, completion, json_handler, sse_handler

KEYS = """
middleware:
  - type: auth
    keys:
      - {id: team-a, key: sk-team-a, models: ["test-*"]}
      - {id: team-b, key: sk-team-b}
  - type: rate_limit
    requests_per_minute: 100
  - type: validate
  - type: session
"""


def config(extra: str = KEYS, upstream: str = "") -> str:
    return f"""
upstreams:
  - name: main
    url: {{backend}}
{upstream}{extra}"""


def sdk(client: Any, key: str = "sk-team-a") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=key, max_retries=0)


async def test_a_plain_request_becomes_chat_and_its_answer_a_response(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    doc = completion("Hello there!")
    doc["usage"] = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    backend.chat(json_handler(doc))
    client = await make_proxy(config(), backend)
    api = sdk(client)
    raw = await api.responses.with_raw_response.create(
        model="test-model", input="Hi", instructions="Be brief.", max_output_tokens=50
    )
    response = raw.parse()
    assert response.output_text == "Hello there!"
    assert response.status == "completed"
    assert response.usage is not None and response.usage.input_tokens == 9
    assert response.usage.output_tokens == 3
    assert response.id.startswith("resp_")
    sent = backend.seen[-1]
    assert sent.path == "/v1/chat/completions"
    body = sent.json()
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert body["max_tokens"] == 50
    # the chain ran: the rate limit counted it, the session was opened
    assert raw.headers["x-ratelimit-remaining-requests"] == "99"
    assert raw.headers["x-session-id"].startswith("sess_")


async def test_a_stream_is_the_responses_event_sequence(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    backend.chat(
        sse_handler(chunk("Hel", role="assistant"), chunk("lo!"), chunk(None, finish="stop"), DONE)
    )
    client = await make_proxy(config(), backend)
    api = sdk(client)
    kinds: list[str] = []
    seqs: list[int] = []
    async with api.responses.stream(model="test-model", input="Hi") as stream:
        async for event in stream:
            kinds.append(event.type)
            seqs.append(event.sequence_number)
        final = await stream.get_final_response()
    assert final.output_text == "Hello!"
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and "response.output_text.done" in kinds
    assert seqs == list(range(len(seqs)))
    body = backend.seen[-1].json()
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


async def test_previous_response_id_continues_the_conversation_in_one_session(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    answers = iter(["Paris.", "About two million."])

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response(completion(next(answers)))

    backend.chat(answer)
    client = await make_proxy(config(), backend)
    api = sdk(client)
    first = await api.responses.with_raw_response.create(
        model="test-model", input="Capital of France?"
    )
    second = await api.responses.with_raw_response.create(
        model="test-model", input="Its population?", previous_response_id=first.parse().id
    )
    assert second.parse().output_text == "About two million."
    assert [m["content"] for m in backend.seen[-1].json()["messages"]] == [
        "Capital of France?",
        "Paris.",
        "Its population?",
    ]
    assert second.headers["x-session-id"] == first.headers["x-session-id"]
    # another key's id is not found, like an unknown one
    other = sdk(client, "sk-team-b")
    for api_, rid in ((other, first.parse().id), (api, "resp_unknown")):
        with pytest.raises(openai.NotFoundError) as missing:
            await api_.responses.create(model="test-model", input="x", previous_response_id=rid)
        assert missing.value.body["param"] == "previous_response_id"  # type: ignore[index]


async def test_stored_responses_are_read_and_deleted_per_key(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(config(), backend)
    api = sdk(client)
    made = await api.responses.create(model="test-model", input="Hi")
    got = await api.responses.retrieve(made.id)
    assert got.id == made.id and got.output_text == made.output_text
    with pytest.raises(openai.NotFoundError):
        await sdk(client, "sk-team-b").responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        await sdk(client, "sk-team-b").responses.delete(made.id)
    await api.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        await api.responses.retrieve(made.id)
    # store: false keeps nothing
    unkept = await api.responses.create(model="test-model", input="Hi", store=False)
    with pytest.raises(openai.NotFoundError):
        await api.responses.retrieve(unkept.id)


async def test_the_chain_refuses_as_for_chat_with_the_responses_parameter_names(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(config(), backend)
    api = sdk(client)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await api.responses.create(model="other-model", input="Hi")
    assert denied.value.body["code"] == "model_not_allowed"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        await api.responses.create(model="test-model", input="Hi", max_output_tokens=-5)
    assert bad.value.body["param"] == "max_output_tokens"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as tool:
        await api.responses.create(
            model="test-model", input="Hi", tools=[{"type": "web_search_preview"}]
        )
    assert "web_search" in tool.value.message
    with pytest.raises(openai.BadRequestError) as item:
        await api.responses.create(
            model="test-model",
            input=[
                {
                    "role": "user",
                    "content": [{"type": "input_file", "file_id": "file-1"}],
                }
            ],
        )
    assert "input_file" in item.value.message
    assert backend.seen == []


async def test_keyword_rules_make_function_call_items(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    backend.chat(json_handler(completion("Thanks, goodbye!")))
    extra = """middleware:
  - type: tool_keywords
    rules:
      - {keywords: [goodbye], tool: end_call}
"""
    client = await make_proxy(config(extra), backend)
    response = await sdk(client).responses.create(
        model="test-model",
        input="Bye",
        tools=[{"type": "function", "name": "end_call", "parameters": {"type": "object"}}],
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "end_call"
    assert json.loads(calls[0].arguments) == {}


async def test_native_upstreams_get_the_request_as_it_came_and_answer_byte_for_byte(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    answer = b'{"id":"resp_native","object":"response","status":"completed","output":[]}'

    async def native(request: web.Request) -> web.StreamResponse:
        return web.Response(body=answer, content_type="application/json")

    backend.on("POST", "/v1/responses", native)
    client = await make_proxy(config("", "    responses: native\n"), backend)
    body = b'{"model": "test-model",  "input": "Hi", "vendor_knob": 1}'
    resp = await client.post(
        "/v1/responses", data=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 200
    assert await resp.read() == answer
    # the request as the client wrote it (vendor fields included), the answer's bytes
    assert backend.seen[-1].path == "/v1/responses"
    assert backend.seen[-1].json() == json.loads(body)
