"""model_override: forced model, default, aliases, per-key models, the reported model
and the alias entries of /v1/models."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from aiohttp import web

from proxy.chain import BuildContext
from proxy.config import ConfigError
from proxy.exchange import Exchange, Handler, Identity, Middleware
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


def fake_identity(options: dict[str, Any], ctx: BuildContext) -> Middleware:
    """A test-only stand-in for auth: every request comes from one key."""
    identity = Identity(
        id=options.get("id", "test-key"),
        scopes=frozenset({"chat", "models"}),
        models=tuple(options.get("models", ["*"])),
        model=options.get("model"),
    )

    async def mw(ex: Exchange, call_next: Handler) -> web.StreamResponse:
        ex.identity = identity
        return await call_next(ex)

    return mw


def show_resolver(options: dict[str, Any], ctx: BuildContext) -> Middleware:
    """A test-only middleware placed after model_override: shows what the resolver
    makes of the names in `names`."""

    async def mw(ex: Exchange, call_next: Handler) -> web.StreamResponse:
        resolver = ex.model_resolver
        assert resolver is not None
        ex.response_headers["x-test-resolved"] = json.dumps(
            {n: resolver(n) for n in options["names"]}
        )
        return await call_next(ex)

    return mw


def config(options: str, before: str = "", after: str = "") -> str:
    """BASIC with a chain: `before`, model_override with `options`, `after`."""
    chain = (
        before
        + "  - type: model_override\n"
        + "".join(f"    {line}\n" for line in options.splitlines())
    )
    return BASIC + "\nmiddleware:\n" + chain + after


def key(model: str | None = None, models: str = '["*"]') -> str:
    line = f"  - type: tests.integration.test_model_override:fake_identity\n    models: {models}\n"
    return line + (f"    model: {model}\n" if model else "")


STREAM = (
    chunk("", role="assistant", model="backend-model"),
    chunk("Hel", model="backend-model"),
    chunk("lo", model="backend-model"),
    chunk(None, finish="stop", model="backend-model"),
    usage_chunk(model="backend-model"),
    DONE,
)


def stream_models(raw: bytes) -> list[str]:
    """The `model` of every data event of a stream."""
    out = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: {"):
            out.append(json.loads(block[6:])["model"])
    return out


async def send(client: Any, body: dict[str, Any]) -> tuple[int, bytes]:
    resp = await client.post("/v1/chat/completions", json=body)
    return resp.status, await resp.read()


def without_model(**extra: Any) -> dict[str, Any]:
    body = chat_body(**extra)
    del body["model"]
    return body


# --- which model the backend receives ---------------------------------------------


FORCED = "model: llama3.1:8b"
DEFAULT = "default: llama3.1:8b"
ALIASES = "aliases: {junis-orchestrator: llama3.1:8b, fast: qwen2.5:0.5b}"
ALIASED_FORCE = "model: junis-orchestrator\naliases: {junis-orchestrator: llama3.1:8b}"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    ("options", "before", "sent", "received"),
    [
        pytest.param(FORCED, "", "junis-orchestrator", "llama3.1:8b", id="forced-any-name"),
        pytest.param(FORCED, "", None, "llama3.1:8b", id="forced-no-name"),
        pytest.param(FORCED, "", "llama3.1:8b", "llama3.1:8b", id="forced-same-name"),
        pytest.param(DEFAULT, "", None, "llama3.1:8b", id="default-fills-missing"),
        pytest.param(DEFAULT, "", "", "llama3.1:8b", id="default-fills-empty"),
        pytest.param(DEFAULT, "", "mistral", "mistral", id="default-keeps-given"),
        pytest.param(ALIASES, "", "junis-orchestrator", "llama3.1:8b", id="alias"),
        pytest.param(ALIASES, "", "fast", "qwen2.5:0.5b", id="other-alias"),
        pytest.param(ALIASES, "", "mistral", "mistral", id="not-an-alias"),
        pytest.param(
            ALIASES + "\ndefault: fast", "", None, "qwen2.5:0.5b", id="default-is-an-alias"
        ),
        pytest.param(ALIASED_FORCE, "", "anything", "llama3.1:8b", id="forced-name-is-an-alias"),
        pytest.param(
            FORCED, key("key-model"), "junis-orchestrator", "key-model", id="key-model-wins"
        ),
        pytest.param(FORCED, key("key-model"), None, "key-model", id="key-model-no-name"),
        pytest.param(FORCED, key(), "junis-orchestrator", "llama3.1:8b", id="key-without-model"),
        pytest.param(ALIASES, key("fast"), "mistral", "qwen2.5:0.5b", id="key-model-is-an-alias"),
        pytest.param(DEFAULT, key("key-model"), "mistral", "key-model", id="key-model-over-client"),
    ],
)
async def test_model_sent_to_backend(
    make_proxy: ProxyFactory,
    backend: Backend,
    options: str,
    before: str,
    sent: str | None,
    received: str,
    stream: bool,
) -> None:
    backend.chat(
        sse_handler(*STREAM) if stream else json_handler(completion(model="backend-model"))
    )
    client = await make_proxy(config(options, before), backend)
    body = (
        chat_body(stream=stream, model=sent) if sent is not None else without_model(stream=stream)
    )
    status, raw = await send(client, body)
    assert status == 200
    assert backend.seen[-1].json()["model"] == received
    assert backend.seen[-1].json()["messages"] == body["messages"]
    # by default the response reports what the backend answered, untouched
    if stream:
        assert raw == b"".join(STREAM)
    else:
        assert json.loads(raw)["model"] == "backend-model"


async def test_no_model_and_no_default_is_left_to_the_backend(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(config(ALIASES), backend)
    status, _ = await send(client, without_model())
    assert status == 200
    assert "model" not in backend.seen[-1].json()


async def test_non_string_model_is_replaced_without_validate(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(config(FORCED), backend)
    status, _ = await send(client, chat_body(model=5))
    assert status == 200
    assert backend.seen[-1].json()["model"] == "llama3.1:8b"


async def test_passthrough_json_requests_are_overridden(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    backend.on("POST", "/v1/embeddings", json_handler({"object": "list", "data": [], "model": "e"}))
    client = await make_proxy(config(ALIASES), backend)
    resp = await client.post("/v1/embeddings", json={"model": "fast", "input": "x"})
    assert resp.status == 200
    assert backend.seen[-1].json() == {"model": "qwen2.5:0.5b", "input": "x"}


async def test_key_allowlist_applies_to_the_model_really_used(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    # the key may use llama only; the client's name is an alias of it (auth checks the
    # model once model_override, after it in the chain, has changed it)
    auth = (
        "  - type: auth\n    keys:\n      - id: llama-only\n        key: sk-llama-only-1\n"
        '        models: ["llama*"]\n'
    )
    client = await make_proxy(config(ALIASES, auth), backend)
    headers = {"Authorization": "Bearer sk-llama-only-1"}
    resp = await client.post(
        "/v1/chat/completions", json=chat_body(model="junis-orchestrator"), headers=headers
    )
    assert resp.status == 200
    assert backend.seen[-1].json()["model"] == "llama3.1:8b"
    resp = await client.post("/v1/chat/completions", json=chat_body(model="fast"), headers=headers)
    assert resp.status == 403
    assert (await resp.json())["error"]["param"] == "model"
    assert len(backend.seen) == 1


async def test_with_the_real_auth_middleware(make_proxy: ProxyFactory, backend: Backend) -> None:
    auth = (
        "  - type: auth\n"
        "    keys:\n"
        "      - {id: pinned, key: key-pinned, model: key-model}\n"
        "      - {id: free, key: key-free}\n"
    )
    client = await make_proxy(config(FORCED, auth), backend)
    for secret, received in (("key-pinned", "key-model"), ("key-free", "llama3.1:8b")):
        resp = await client.post(
            "/v1/chat/completions",
            json=chat_body(model="junis-orchestrator"),
            headers={"X-API-Key": secret},
        )
        assert resp.status == 200
        assert backend.seen[-1].json()["model"] == received


# --- the model the client sees ----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "sent", "reported"),
    [
        pytest.param(FORCED, "junis-orchestrator", "junis-orchestrator", id="client-name"),
        pytest.param(FORCED, None, "llama3.1:8b", id="forced-name-when-none-sent"),
        pytest.param(ALIASED_FORCE, None, "junis-orchestrator", id="forced-alias-name"),
        pytest.param(ALIASES, "fast", "fast", id="alias-name"),
        pytest.param(DEFAULT, None, "llama3.1:8b", id="default-name"),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_report_model_requested(
    make_proxy: ProxyFactory,
    backend: Backend,
    options: str,
    sent: str | None,
    reported: str,
    stream: bool,
) -> None:
    backend.chat(
        sse_handler(*STREAM) if stream else json_handler(completion(model="backend-model"))
    )
    client = await make_proxy(config(options + "\nreport_model: requested"), backend)
    body = (
        chat_body(stream=stream, model=sent) if sent is not None else without_model(stream=stream)
    )
    status, raw = await send(client, body)
    assert status == 200
    if stream:
        assert stream_models(raw) == [reported] * 5
        assert raw.endswith(DONE)
        assert b'"content":"Hel"' in raw
    else:
        doc = json.loads(raw)
        assert doc["model"] == reported
        assert doc["choices"] == completion()["choices"]


async def test_models_list_has_one_entry_per_alias(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    backend.on(
        "GET",
        "/v1/models",
        json_handler(
            {
                "object": "list",
                "data": [
                    {"id": "llama3.1:8b", "object": "model", "owned_by": "ollama"},
                    {"id": "fast", "object": "model", "owned_by": "vllm"},
                ],
            }
        ),
    )
    client = await make_proxy(
        config("aliases: {junis-orchestrator: llama3.1:8b, fast: x, other: gone}"), backend
    )
    resp = await client.get("/v1/models")
    assert resp.status == 200
    data = (await resp.json())["data"]
    assert [m["id"] for m in data] == ["llama3.1:8b", "fast", "junis-orchestrator", "other"]
    assert data[2] == {
        "id": "junis-orchestrator",
        "object": "model",
        "created": 0,
        "owned_by": "ollama",
        "root": "llama3.1:8b",
        "parent": "llama3.1:8b",
    }
    assert data[3]["owned_by"] == "chat-proxy"
    assert data[1] == {"id": "fast", "object": "model", "owned_by": "vllm"}


@pytest.mark.parametrize(
    ("options", "before", "resolved"),
    [
        pytest.param(
            ALIASES, "", {"junis-orchestrator": "llama3.1:8b", "mistral": "mistral"}, id="aliases"
        ),
        pytest.param(
            FORCED, "", {"junis-orchestrator": "llama3.1:8b", "mistral": "llama3.1:8b"}, id="forced"
        ),
        pytest.param(
            ALIASES,
            key("fast"),
            {"junis-orchestrator": "qwen2.5:0.5b", "mistral": "qwen2.5:0.5b"},
            id="key",
        ),
    ],
)
async def test_model_resolver(
    make_proxy: ProxyFactory, backend: Backend, options: str, before: str, resolved: dict[str, str]
) -> None:
    after = "  - type: tests.integration.test_model_override:show_resolver\n    names: [junis-orchestrator, mistral]\n"
    client = await make_proxy(config(options, before, after), backend)
    for resp in (
        await client.get("/v1/models"),
        await client.post("/v1/chat/completions", json=chat_body()),
    ):
        assert resp.status == 200
        assert json.loads(resp.headers["x-test-resolved"]) == resolved


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError) as info:
        config_from(config('model: ""\nreport_model: client\naliases: [a]'))
    text = "\n".join(info.value.errors)
    assert "middleware[0].model_override.model:" in text
    assert "middleware[0].model_override.report_model: must be one of" in text
    assert "middleware[0].model_override.aliases: must be a mapping" in text


# --- through the OpenAI SDK, with validate in the chain -----------------------------


SDK_CONFIG = config(
    "model: llama3.1:8b\nreport_model: requested",
    before="  - type: validate\n",
)


async def test_openai_sdk_with_any_model_name(make_proxy: ProxyFactory, backend: Backend) -> None:
    backend.chat(json_handler(completion("Hi there", model="llama3.1:8b")))
    client = await make_proxy(SDK_CONFIG, backend)
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
    answer = await sdk.chat.completions.create(
        model="junis-orchestrator",
        messages=[{"role": "user", "content": "Hello"}],
        extra_body={"elevenlabs_extra_body": {"conversation_id": "conv_1"}},
    )
    assert answer.choices[0].message.content == "Hi there"
    assert answer.model == "junis-orchestrator"
    seen = backend.seen[-1].json()
    assert seen["model"] == "llama3.1:8b"
    assert "elevenlabs_extra_body" not in seen

    backend.chat(sse_handler(*STREAM))
    stream = await sdk.chat.completions.create(
        model="junis-orchestrator",
        messages=[{"role": "user", "content": "Hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert {c.model for c in chunks} == {"junis-orchestrator"}
    assert backend.seen[-1].json()["model"] == "llama3.1:8b"
    await sdk.close()


async def test_models_list_through_auth_judges_aliases_by_target(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    backend.on(
        "GET",
        "/v1/models",
        json_handler({"object": "list", "data": [{"id": "llama3.1:8b"}, {"id": "qwen2.5:0.5b"}]}),
    )
    auth = '  - type: auth\n    keys:\n      - {id: k, key: key-k, models: ["llama*"]}\n'
    client = await make_proxy(config(ALIASES, auth), backend)
    resp = await client.get("/v1/models", headers={"Authorization": "Bearer key-k"})
    assert resp.status == 200
    assert [m["id"] for m in (await resp.json())["data"]] == ["llama3.1:8b", "junis-orchestrator"]
