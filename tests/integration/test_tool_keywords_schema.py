"""Keyword tool calls whose arguments validate against the schema the request declares,
with config/elevenlabs.yaml as it ships and ElevenLabs' request shape: each of its
system tools fires, streamed and not; undeclared properties are left out; a rule that
cannot fit does not fire and says so once in the log."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from proxy import cli
from proxy.config import ConfigError
from tests.fixtures import (
    BASIC,
    DONE,
    Backend,
    ProxyFactory,
    chat_body,
    chunk,
    completion,
    config_from,
    json_handler,
    sse_handler,
    usage_chunk,
)
from tests.fixtures.elevenlabs_tools import (
    AUTH,
    CONFIG,
    CONVERSATION,
    config_env,
    elevenlabs_request,
    no_parameters,
    parameters_of,
    strict,
    tool,
    with_parameters,
)

Client = Any
CHAT = "/v1/chat/completions"
LOGGER = "chat_proxy.tool_keywords"


def stream_reply(text: str) -> tuple[bytes, ...]:
    """The backend's stream of `text`, cut in three, then usage and [DONE]."""
    third = max(len(text) // 3, 1)
    parts = [text[:third], text[third : 2 * third], text[2 * third :]]
    return (
        chunk(role="assistant", content=""),
        *(chunk(p) for p in parts if p),
        chunk(finish="stop"),
        usage_chunk(30, 9),
        DONE,
    )


def chunks_of(raw: bytes) -> list[dict[str, Any]]:
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    out = []
    for event in raw.decode().split("\n\n"):
        data = [line[6:] for line in event.split("\n") if line.startswith("data: ")]
        if data and data[0] != "[DONE]":
            out.append(json.loads("\n".join(data)))
    return out


async def ask(
    client: Client, backend: Backend, reply: str, tools: list[Any], *, stream: bool
) -> tuple[str, list[dict[str, Any]], str]:
    """(content, tool calls, finish_reason) of one ElevenLabs request whose backend
    answers `reply`."""
    if stream:
        backend.chat(sse_handler(*stream_reply(reply)))
    else:
        backend.chat(json_handler(completion(reply)))
    body = elevenlabs_request("...", tools, stream=stream)
    if not stream:
        del body["stream_options"]
    resp = await client.post(CHAT, json=body, headers=AUTH)
    assert resp.status == 200, await resp.text()
    assert resp.headers["X-Session-Id"] == CONVERSATION
    sent = backend.seen[-1].json()
    assert "elevenlabs_extra_body" not in sent and sent["tools"] == tools
    if not stream:
        choice = (await resp.json())["choices"][0]
        message = choice["message"]
        return message["content"], message.get("tool_calls", []), choice["finish_reason"]
    chunks = chunks_of(await resp.read())
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 39
    content, calls, finish = "", [], ""
    for c in chunks:
        for ch in c["choices"]:
            content += ch["delta"].get("content") or ""
            calls.extend(ch["delta"].get("tool_calls") or ())
            finish = ch["finish_reason"] or finish
    return content, calls, finish


@pytest.fixture
async def elevenlabs(make_proxy: ProxyFactory, backend: Backend, tmp_path: Path) -> Client:
    """The proxy on config/elevenlabs.yaml as it ships, in front of the stand-in."""
    env = config_env(backend.url, str(tmp_path / "sessions.db"))
    return await make_proxy(CONFIG.read_text(), backend, env)


# (tool, what the model says, the arguments of the call) with config/elevenlabs.yaml
SYSTEM_TOOL_CASES = [
    (
        "voicemail_detection",
        "Hello? It seems I've reached voicemail. I will call back later.",
        {"reason": "voicemail greeting detected (reached voicemail)"},
    ),
    (
        "transfer_to_number",
        "Of course. I'm transferring you to a colleague at +15550100 now.",
        {
            "transfer_number": "+15550100",
            "client_message": "Please hold while I transfer you to a colleague.",
            "agent_message": "A caller from the voice agent asked to speak with a person.",
            "reason": "the caller asked for a person",
        },
    ),
    (
        "transfer_to_agent",
        "Sure, I am transferring you to agent 1, who handles billing.",
        {"agent_number": 1, "reason": "handed over: transferring you to agent 1"},
    ),
    (
        "language_detection",
        "Of course! Switching to Spanish now. ¿En qué puedo ayudarle?",
        {"reason": "the caller asked for Spanish", "language": "es"},
    ),
    (
        "play_keypad_touch_tone",
        "I'll navigate the menu: pressing 2 for customer service.",
        {"dtmf_tones": "2", "reason": "navigating the phone menu (pressing 2)"},
    ),
    (
        "skip_turn",
        "Sure, take your time.",
        {"reason": "the caller asked for a moment"},
    ),
    (
        "end_call",
        "Thank you for calling. Goodbye!",
        {"reason": "the conversation is over"},
    ),
]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("strict_schema", [False, True], ids=["as-documented", "strict"])
@pytest.mark.parametrize(("name", "reply", "arguments"), SYSTEM_TOOL_CASES)
async def test_each_system_tool_fires_with_schema_valid_arguments(
    elevenlabs: Client,
    backend: Backend,
    name: str,
    reply: str,
    arguments: dict[str, Any],
    stream: bool,
    strict_schema: bool,
) -> None:
    declared = strict(tool(name)) if strict_schema else tool(name)
    content, calls, finish = await ask(elevenlabs, backend, reply, [declared], stream=stream)
    assert content == reply  # what the caller hears is unchanged
    assert finish == "tool_calls"
    [call] = calls
    assert call["function"]["name"] == name
    sent = json.loads(call["function"]["arguments"])
    jsonschema.validate(sent, parameters_of(declared))
    assert sent == arguments


@pytest.mark.parametrize(("name", "reply", "arguments"), SYSTEM_TOOL_CASES)
async def test_with_every_system_tool_declared_each_reply_calls_its_own(
    elevenlabs: Client, backend: Backend, name: str, reply: str, arguments: dict[str, Any]
) -> None:
    tools = [tool(n) for n, _, _ in SYSTEM_TOOL_CASES]
    _, calls, _ = await ask(elevenlabs, backend, reply, tools, stream=True)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        (name, arguments)
    ]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_a_tool_declared_with_no_parameters_gets_an_empty_object(
    elevenlabs: Client, backend: Backend, stream: bool
) -> None:
    # the end_call rule gives a reason; a tool that takes none is called with {}
    for declared in (
        no_parameters("end_call"),
        with_parameters(tool("end_call"), reason=None, message=None),
    ):
        declared["function"].get("parameters", {}).pop("required", None)
        _, calls, finish = await ask(elevenlabs, backend, "Goodbye!", [declared], stream=stream)
        assert finish == "tool_calls"
        assert [c["function"]["arguments"] for c in calls] == ["{}"]


async def test_values_of_the_declared_types_and_enum(elevenlabs: Client, backend: Backend) -> None:
    # an agent whose languages are an enum of codes; another whose agent numbers are
    # declared as strings
    languages = with_parameters(
        tool("language_detection"), language={"type": "string", "enum": ["en", "es", "fr"]}
    )
    reply = "No problem, let's continue in Français."
    _, [call], _ = await ask(elevenlabs, backend, reply, [languages], stream=True)
    assert json.loads(call["function"]["arguments"])["language"] == "fr"
    numbers = with_parameters(tool("transfer_to_agent"), agent_number={"type": "string"})
    reply = "Connecting you to agent 3."
    _, [call], _ = await ask(elevenlabs, backend, reply, [numbers], stream=True)
    assert json.loads(call["function"]["arguments"])["agent_number"] == "3"


async def test_the_schema_fills_what_the_reply_does_not_say(
    elevenlabs: Client, backend: Backend
) -> None:
    # the tool's one configured number, declared as an enum, is the transfer number
    one_number = with_parameters(
        tool("transfer_to_number"), transfer_number={"type": "string", "enum": ["+15550199"]}
    )
    reply = "Let me connect you with a person."
    _, [call], _ = await ask(elevenlabs, backend, reply, [one_number], stream=False)
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, parameters_of(one_number))
    assert arguments["transfer_number"] == "+15550199"


async def test_a_slow_model_gets_the_filler_and_its_tool_call_still_fires(
    make_proxy: ProxyFactory, backend: Backend, tmp_path: Path
) -> None:
    env = {**config_env(backend.url, str(tmp_path / "s.db")), "FILLER_AFTER_MS": "100"}
    client = await make_proxy(CONFIG.read_text(), backend, env)
    backend.chat(sse_handler(*stream_reply("Thank you for calling. Goodbye!"), delay=0.3))
    resp = await client.post(CHAT, json=elevenlabs_request("bye", [tool("end_call")]), headers=AUTH)
    chunks = chunks_of(await resp.read())
    texts = [ch["delta"].get("content") for c in chunks for ch in c["choices"]]
    assert texts[0] == "... "  # the filler, once, before the model's first word
    assert "".join(t or "" for t in texts) == "... Thank you for calling. Goodbye!"
    calls = [
        call for c in chunks for ch in c["choices"] for call in ch["delta"].get("tool_calls") or ()
    ]
    assert [json.loads(call["function"]["arguments"]) for call in calls] == [
        {"reason": "the conversation is over"}
    ]


# --- rules that cannot fit ----------------------------------------------------------------


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_an_unfit_rule_does_not_fire_and_says_so_once(
    elevenlabs: Client, backend: Backend, caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    # a plain string transfer_number, and a reply that names no number: nothing fills it
    declared = tool("transfer_to_number")
    reply = "I'm transferring you to a colleague now."
    for _ in range(3):
        content, calls, finish = await ask(elevenlabs, backend, reply, [declared], stream=stream)
        assert (content, calls, finish) == (reply, [], "stop")
    [record] = warnings_of(caplog)
    assert record.__dict__["tool"] == "transfer_to_number"
    assert record.__dict__["rule"] == 1  # its place in the file's rules
    assert "'transfer_number' has no value" in record.getMessage()

    # a language the agent does not have: that rule does not fire either, and says so
    languages = with_parameters(
        tool("language_detection"), language={"type": "string", "enum": ["en", "fr"]}
    )
    for _ in range(2):
        _, calls, finish = await ask(
            elevenlabs, backend, "Switching to Spanish.", [languages], stream=stream
        )
        assert (calls, finish) == ([], "stop")
    records = warnings_of(caplog)
    assert [r.__dict__["tool"] for r in records] == ["transfer_to_number", "language_detection"]
    assert "'es' is not one of the enum values ('en', 'fr')" in records[1].getMessage()


async def test_an_unfit_rule_lets_the_next_rule_fire(elevenlabs: Client, backend: Backend) -> None:
    tools = [tool("transfer_to_number"), tool("end_call")]
    reply = "I'll transfer you to a person. Goodbye!"
    _, calls, _ = await ask(elevenlabs, backend, reply, tools, stream=True)
    assert [c["function"]["name"] for c in calls] == ["end_call"]


async def test_a_later_match_of_the_rule_may_fit(elevenlabs: Client, backend: Backend) -> None:
    # the first language named is not the agent's; the second is
    languages = with_parameters(
        tool("language_detection"), language={"type": "string", "enum": ["en", "de"]}
    )
    reply = "I cannot switch to Klingon, but switching to German works."
    _, [call], _ = await ask(elevenlabs, backend, reply, [languages], stream=True)
    assert json.loads(call["function"]["arguments"]) == {
        "reason": "the caller asked for German",
        "language": "de",
    }


async def test_constraints_of_the_declared_schema_hold(
    elevenlabs: Client, backend: Backend
) -> None:
    # a keypad tool that takes one digit at a time: "1234#" does not fit, "5" does
    one_digit = with_parameters(
        tool("play_keypad_touch_tone"), dtmf_tones={"type": "string", "pattern": "^[0-9]$"}
    )
    _, calls, _ = await ask(elevenlabs, backend, "Dialing 1234# now.", [one_digit], stream=True)
    assert calls == []
    _, [call], _ = await ask(elevenlabs, backend, "Pressing 5.", [one_digit], stream=True)
    assert json.loads(call["function"]["arguments"])["dtmf_tones"] == "5"


# --- rules of one's own -----------------------------------------------------------------

OWN = (
    BASIC
    + r"""
middleware:
  - type: tool_keywords
    rules:
      - tool: end_call
        keywords: [goodbye]
        arguments: {reason: "over", message: "Bye!", note: "heard {match}"}
      - tool: transfer_to_agent
        pattern: 'agent (?P<agent_number>\w+)'
        arguments: {reason: "asked for {agent_number}"}
        values: {agent_number: {billing: 0, support: "1"}}
"""
)


async def test_undeclared_properties_left_out_only_where_the_schema_forbids(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(OWN, backend)
    documented = tool("end_call")
    cases = [
        (strict(documented), {"reason": "over", "message": "Bye!"}),
        (documented, {"reason": "over", "message": "Bye!", "note": "heard Goodbye"}),
        (strict(with_parameters(documented, message=None)), {"reason": "over"}),
    ]
    for declared, expected in cases:
        backend.chat(json_handler(completion("Goodbye.")))
        resp = await client.post(CHAT, json=chat_body(tools=[declared]))
        [call] = (await resp.json())["choices"][0]["message"]["tool_calls"]
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, parameters_of(declared))
        assert arguments == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("agent billing please", {"reason": "asked for billing", "agent_number": 0}),
        ("agent SUPPORT please", {"reason": "asked for SUPPORT", "agent_number": 1}),
        ("agent 2 please", {"reason": "asked for 2", "agent_number": 2}),
        ("agent sales please", None),  # not a number, not mapped: the rule does not fit
    ],
)
async def test_a_named_group_fills_its_property_through_values(
    make_proxy: ProxyFactory, backend: Backend, reply: str, expected: dict[str, Any] | None
) -> None:
    client = await make_proxy(OWN, backend)
    backend.chat(json_handler(completion(reply)))
    resp = await client.post(CHAT, json=chat_body(tools=[strict(tool("transfer_to_agent"))]))
    message = (await resp.json())["choices"][0]["message"]
    if expected is None:
        assert "tool_calls" not in message
    else:
        assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == expected


@pytest.mark.parametrize(
    ("rule", "error"),
    [
        (
            r"{tool: t, pattern: 'x(?P<n>\d)', arguments: {a: '{m}'}}",
            "middleware[0].tool_keywords.rules[0]: arguments: {m} names no group of the pattern",
        ),
        (
            "{tool: t, keywords: [x], arguments: {a: '{n}'}}",
            "middleware[0].tool_keywords.rules[0]: arguments: {n} names no group of the pattern",
        ),
        (
            "{tool: t, keywords: [x], values: {a: {b: c}}}",
            "middleware[0].tool_keywords.rules[0]: values: a names no argument and no group",
        ),
        (
            "{tool: t, keywords: [x], arguments: {a: b}, values: {a: {' ': c}}}",
            "middleware[0].tool_keywords.rules[0].values: a: a text to map must not be blank",
        ),
        (
            "{tool: t, keywords: [x], arguments: {a: b}, values: {a: [c]}}",
            "middleware[0].tool_keywords.rules[0].values.a: must be a mapping",
        ),
    ],
)
def test_bad_placeholders_and_values_are_config_errors(rule: str, error: str) -> None:
    text = BASIC + f"middleware:\n  - type: tool_keywords\n    rules:\n      - {rule}\n"
    with pytest.raises(ConfigError) as info:
        config_from(text.replace("{backend}", "http://127.0.0.1:9"))
    assert any(line.startswith(error) for line in info.value.errors), info.value.errors


def test_the_shipped_config_checks_with_no_variable_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in config_env("", ""):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["check", "--config", str(CONFIG)]) == 0
    assert capsys.readouterr().out.startswith(f"{CONFIG}: ok")
    loaded = config_from(CONFIG.read_text(), env={})
    [entry] = [m for m in loaded.chain if m.type == "tool_keywords"]
    assert sorted(rule.tool for rule in entry.options.rules) == sorted(
        [
            "end_call",
            "language_detection",
            "transfer_to_agent",
            "transfer_to_number",
            "skip_turn",
            "voicemail_detection",
            "play_keypad_touch_tone",
        ]
    )
