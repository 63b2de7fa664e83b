"""ElevenLabs' system tools through the real OpenAI Python SDK, the proxy and the real
llama.cpp server.

The requests have ElevenLabs' shape (stream with include_usage, the system tools in
`tools` as the platform declares them, parallel_tool_calls off, user_id and
elevenlabs_extra_body). The tiny random model says random words, never "goodbye" or
"pressing 2": so config/elevenlabs.yaml as it ships is run to show that its rules stay
quiet on such text and that the request and the session work, and rules that match
any word (`(?P<word>[A-Za-z]+)`, its first word filling `reason`) make each system tool
fire on the model's real output, with arguments that the declared schema validates
(jsonschema), streamed and not.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

try:
    from .llama_server import LlamaBackend
except ImportError:
    from llama_server import LlamaBackend

from tests.fixtures import ProxyFactory
from tests.fixtures.elevenlabs_tools import (
    CONFIG,
    CONVERSATION,
    KEY,
    SYSTEM_TOOLS,
    config_env,
    elevenlabs_request,
    parameters_of,
    strict,
    tool,
)

MAX_TOKENS = 12
FIRST_WORD = re.compile(r"[A-Za-z]+")


def sdk(client: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=KEY, max_retries=0)


def sdk_kwargs(model: str, tools: list[Any], *, stream: bool) -> dict[str, Any]:
    """ElevenLabs' request as the SDK's keyword arguments (its own fields in extra_body)."""
    doc = elevenlabs_request("I need help with my order.", tools, model=model)
    doc["max_tokens"] = MAX_TOKENS  # the tiny model always runs to max_tokens
    extra = {k: doc.pop(k) for k in ("user_id", "elevenlabs_extra_body")}
    doc["extra_body"] = extra
    doc["stream"] = stream
    if not stream:
        del doc["stream_options"]
    return doc


async def run(
    api: openai.AsyncOpenAI, kwargs: dict[str, Any]
) -> tuple[str, list[tuple[str, str]], str | None]:
    """(content, [(tool name, arguments)], finish_reason) of one request."""
    if not kwargs["stream"]:
        raw = await api.chat.completions.with_raw_response.create(**kwargs)
        assert raw.headers["x-session-id"] == CONVERSATION
        choice = raw.parse().choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()]
        return choice.message.content or "", calls, choice.finish_reason
    stream = await api.chat.completions.create(**kwargs)
    content, finish = "", None
    calls: list[tuple[str, str]] = []
    async for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for call in ch.delta.tool_calls or ():
                assert call.function is not None
                calls.append((call.function.name or "", call.function.arguments or ""))
            finish = ch.finish_reason or finish
    return content, calls, finish


async def test_the_shipped_config_in_front_of_llama(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend, tmp_path: Path
) -> None:
    env = config_env(llama_backend.base_url, str(tmp_path / "sessions.db"))
    client = await llama_proxy(CONFIG.read_text(), env)
    api = sdk(client)
    tools = [tool(name) for name in SYSTEM_TOOLS]
    for stream in (True, False):
        content, calls, finish = await run(
            api, sdk_kwargs(llama_backend.model, tools, stream=stream)
        )
        assert content
        # random words: a rule that fired anyway must have sent arguments that validate
        for name, arguments in calls:
            jsonschema.validate(json.loads(arguments), parameters_of(SYSTEM_TOOLS[name]))
        assert finish == ("tool_calls" if calls else "length")
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(
            base_url=str(client.make_url("/v1")), api_key="sk-wrong", max_retries=0
        ).chat.completions.create(**sdk_kwargs(llama_backend.model, tools, stream=False))
    await api.close()


# Per tool: what the rule gives besides `reason`. Strings where the schema wants an
# integer, a language name where it wants a code, and a property the strict schema does
# not declare (`note`), so the proxy's fitting shows in what the model's reply becomes.
OTHER_ARGUMENTS: dict[str, dict[str, Any]] = {
    "end_call": {"message": "Goodbye!"},
    "language_detection": {"language": "Spanish"},
    "transfer_to_agent": {"agent_number": "1"},
    "transfer_to_number": {
        "transfer_number": "+15550100",
        "client_message": "Please hold.",
        "agent_message": "A caller needs help with an order.",
    },
    "skip_turn": {},
    "play_keypad_touch_tone": {"dtmf_tones": "2"},
    "voicemail_detection": {},
}
EXPECTED: dict[str, dict[str, Any]] = {
    **OTHER_ARGUMENTS,
    "language_detection": {"language": "es"},
    "transfer_to_agent": {"agent_number": 1},
}


def any_word_chain(name: str) -> str:
    arguments = {"reason": "the model said {word}", "note": "dropped", **OTHER_ARGUMENTS[name]}
    values = {"language": {"spanish": "es"}} if "language" in arguments else {}
    return f"""
upstreams:
  - name: llama
    url: {{llama}}
    timeouts: {{connect: 5, first_byte: 30, idle: 30}}
middleware:
  - type: validate
  - type: session
  - type: tool_keywords
    rules:
      - tool: {name}
        pattern: '(?P<word>[A-Za-z]+)'
        arguments: {json.dumps(arguments)}
        values: {json.dumps(values)}
"""


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("name", sorted(SYSTEM_TOOLS))
async def test_each_system_tool_fires_on_the_models_reply(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend, name: str, stream: bool
) -> None:
    client = await llama_proxy(any_word_chain(name))
    api = sdk(client)
    declared = strict(tool(name))
    content, calls, finish = await run(
        api, sdk_kwargs(llama_backend.model, [declared], stream=stream)
    )
    await api.close()
    assert finish == "tool_calls"
    [(called, arguments)] = calls
    assert called == name
    sent = json.loads(arguments)
    jsonschema.validate(sent, parameters_of(declared))
    first = FIRST_WORD.search(content)
    assert first is not None
    assert sent == {"reason": f"the model said {first.group(0)}", **EXPECTED[name]}
