"""The auth middleware: keys from headers, scopes, model allowlist, /v1/models
filtering, keys files, per-key settings, and a key that never leaks."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import logging
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from proxy.chain import BuildContext, build_chain, describe
from proxy.cli import main
from proxy.config import ConfigError
from proxy.exchange import Exchange, Handler, Middleware
from proxy.loader import load_text
from proxy.observability import JsonFormatter
from tests.fixtures import BASIC, Backend, ProxyFactory, chat_body, config_from, json_handler

KEY = "sk-test-4f1c2a9e7d3b"
OTHER_KEY = "sk-test-models-only-88aa"
SHA = hashlib.sha256(KEY.encode()).hexdigest()
OTHER_SHA = hashlib.sha256(OTHER_KEY.encode()).hexdigest()

AUTH = (
    BASIC
    + f"""
middleware:
  - type: auth
    keys:
      - id: web-app
        key_sha256: {SHA}
        scopes: [chat, models, sessions:read]
      - id: lister
        key_sha256: {OTHER_SHA}
        scopes: [models]
        models: ["llama*"]
"""
)

MODELS = {
    "object": "list",
    "data": [
        {"id": "llama3.1:8b", "object": "model"},
        {"id": "llama3.1:70b", "object": "model"},
        {"id": "gpt-4o", "object": "model"},
    ],
}


def error_of(doc: Any) -> dict[str, Any]:
    assert set(doc) == {"error"}
    err: dict[str, Any] = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def auth_config(keys: str, extra: str = "", header: str | None = None) -> str:
    head = f"    header: {header}\n" if header else ""
    return BASIC + "middleware:\n  - type: auth\n" + head + "    keys:\n" + keys + extra


def log_text(records: list[logging.LogRecord]) -> str:
    fmt = JsonFormatter()
    return "\n".join(fmt.format(r) for r in records)


# --- reading the key ------------------------------------------------------------


async def test_x_api_key_header_authenticates(make_proxy: ProxyFactory, backend: Backend) -> None:
    client = await make_proxy(AUTH, backend)
    resp = await client.post("/v1/chat/completions", json=chat_body(), headers={"X-API-Key": KEY})
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["message"]["content"] == "Hello!"
    assert len(backend.seen) == 1


async def test_bearer_authenticates(make_proxy: ProxyFactory, backend: Backend) -> None:
    client = await make_proxy(AUTH, backend)
    headers = {"Authorization": f"bearer  {KEY} "}
    resp = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
    assert resp.status == 200


async def test_no_key_is_401_and_backend_untouched(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(AUTH, backend)
    for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"X-API-Key": "  "}):
        resp = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
        assert resp.status == 401
        err = error_of(await resp.json())
        assert err["type"] == "authentication_error"
        assert err["message"].startswith("You didn't provide an API key.")
        assert "X-API-Key" in err["message"]
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert resp.headers["X-Request-Id"]
    assert backend.seen == []


async def test_unknown_key_is_401_without_echoing_it(
    make_proxy: ProxyFactory, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await make_proxy(AUTH, backend)
    # the right key with one character changed or added, and a stranger
    for bad in (KEY[:-1] + "X", KEY + "0", "sk-nobody-knows-me"):
        resp = await client.post(
            "/v1/chat/completions", json=chat_body(), headers={"X-API-Key": bad}
        )
        assert resp.status == 401
        raw = await resp.text()
        err = error_of(json.loads(raw))
        assert err["type"] == "authentication_error"
        assert err["code"] == "invalid_api_key"
        assert err["message"].startswith("Incorrect API key provided")
        assert bad not in raw and bad not in str(resp.headers)
        assert bad not in log_text(caplog.records)
    assert backend.seen == []


async def test_configured_header_replaces_x_api_key_and_is_not_forwarded(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    text = auth_config(f"      - {{id: web-app, key_sha256: {SHA}}}\n", header="X-Proxy-Key")
    client = await make_proxy(text, backend)
    resp = await client.post(
        "/v1/chat/completions",
        json=chat_body(),
        headers={"X-Proxy-Key": KEY, "X-Other": "kept"},
    )
    assert resp.status == 200
    seen = backend.seen[-1]
    assert "X-Proxy-Key" not in seen.headers
    assert seen.headers["X-Other"] == "kept"
    assert KEY not in str(seen.headers)
    # the default header is not read when another is configured; Bearer still is
    resp = await client.post("/v1/chat/completions", json=chat_body(), headers={"X-API-Key": KEY})
    assert resp.status == 401
    assert "X-Proxy-Key header" in error_of(await resp.json())["message"]
    headers = {"Authorization": f"Bearer {KEY}"}
    resp = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
    assert resp.status == 200


# --- keys in the configuration ---------------------------------------------------


async def test_plain_key_from_environment_is_hashed_and_not_kept(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    text = auth_config("      - {id: env-key, key: '${WEB_APP_KEY}', scopes: [chat]}\n")
    config = config_from(text, backend, env={"WEB_APP_KEY": KEY})
    shown = "\n".join(describe(config))
    assert "env-key" in shown
    assert KEY not in shown
    assert KEY not in repr(config.chain[0].options)
    assert KEY not in json.dumps(config.chain[0].options.model_dump())
    entry = config.chain[0].options.keys[0]
    assert entry.key is None
    assert KEY not in repr(vars(entry))
    client = await make_proxy(text, backend, env={"WEB_APP_KEY": KEY})
    resp = await client.post("/v1/chat/completions", json=chat_body(), headers={"X-API-Key": KEY})
    assert resp.status == 200


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            "{id: a, key_sha256: " + SHA + ", scopes: [chat, root]}",
            "middleware[0].auth.keys[0].scopes[1]: must be one of 'chat', 'models', "
            "'sessions:read', 'sessions:write' or 'admin'",
        ),
        (
            "{id: a, key: " + KEY + ", key_sha256: " + SHA + "}",
            "middleware[0].auth.keys[0].key: give either key or key_sha256, not both",
        ),
        ("{id: a}", "middleware[0].auth.keys[0]: key_sha256 (or key) is required"),
        ("{id: a, key: ''}", "middleware[0].auth.keys[0].key: must not be empty"),
        (
            "{id: a, key_sha256: abc}",
            "middleware[0].auth.keys[0].key_sha256: must be 64 hexadecimal characters",
        ),
        ("{id: ' ', key: " + KEY + "}", "middleware[0].auth.keys[0].id: must not be empty"),
        ("{id: a, key: " + KEY + ", models: []}", "middleware[0].auth.keys[0].models: must not"),
        (
            "{id: a, key: " + KEY + ", limits: {max_concurrent: 0}}",
            "middleware[0].auth.keys[0].limits.max_concurrent: must be a positive integer",
        ),
        ("{id: a, key: " + KEY + ", admin: true}", "middleware[0].auth.keys[0].admin: unknown key"),
    ],
)
def test_invalid_key_entries_are_reported_with_their_path(entry: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(auth_config(f"      - {entry}\n").replace("{backend}", "http://127.0.0.1:9"))
    assert any(line.startswith(expected) for line in info.value.errors), info.value.errors
    assert KEY not in str(info.value)


def test_invalid_auth_options_are_reported() -> None:
    base = BASIC.replace("{backend}", "http://127.0.0.1:9") + "middleware:\n  - type: auth\n"
    with pytest.raises(ConfigError) as info:
        load_text(base)
    assert info.value.errors == ["middleware[0].auth: give keys, keys_file or both"]
    with pytest.raises(ConfigError) as info:
        load_text(base + f"    header: X-Request-Id\n    keys: [{{id: a, key_sha256: {SHA}}}]\n")
    assert info.value.errors == [
        "middleware[0].auth.header: X-Request-Id is used by the proxy itself; choose another header"
    ]


def test_duplicate_ids_and_keys_are_reported_when_the_chain_is_built() -> None:
    text = auth_config(
        f"      - {{id: a, key: {KEY}}}\n      - {{id: a, key_sha256: {OTHER_SHA}}}\n"
        f"      - {{id: b, key_sha256: {SHA}}}\n"
    ).replace("{backend}", "http://127.0.0.1:9")
    config = load_text(text)
    with pytest.raises(ConfigError) as info:
        build_chain(BuildContext(config=config))
    assert info.value.errors == [
        "middleware[0].auth.keys[1].id: duplicate id 'a' (also at keys[0])",
        "middleware[0].auth.keys[2]: the same key as keys[0]",
    ]


async def test_keys_file_relative_to_the_working_directory(
    make_proxy: ProxyFactory,
    backend: Backend,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FILE_KEY", OTHER_KEY)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "keys.yaml").write_text(
        f"- id: from-file\n  key_sha256: {SHA}\n  scopes: [chat]\n"
        "- id: from-env\n  key: ${FILE_KEY}\n  scopes: [models]\n"
    )
    text = auth_config(
        "      - {id: inline, key: sk-inline-1, scopes: [chat]}\n",
        extra="    keys_file: conf/keys.yaml\n",
    )
    client = await make_proxy(text, backend)
    for key, status in ((KEY, 200), ("sk-inline-1", 200), (OTHER_KEY, 403), ("sk-nope", 401)):
        resp = await client.post(
            "/v1/chat/completions", json=chat_body(), headers={"X-API-Key": key}
        )
        assert resp.status == status, key
    resp = await client.get("/v1/models", headers={"X-API-Key": OTHER_KEY})
    assert resp.status == 200


def test_keys_file_errors_have_paths_in_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    (tmp_path / "keys.yaml").write_text(
        f"- id: good\n  key_sha256: {SHA}\n"
        f"- id: bad\n  key: {OTHER_KEY}\n  scopes: [chat, root]\n"
        "- id: env\n  key: ${NOT_SET_ANYWHERE}\n"
        f"- id: good\n  key_sha256: {OTHER_SHA}\n"
    )
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(
        "upstreams: [{name: a, url: 'http://127.0.0.1:9/v1'}]\n"
        "middleware:\n  - type: auth\n    keys_file: keys.yaml\n"
    )
    assert main(["check", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "middleware[0].auth.keys_file[1].scopes[1]: must be one of" in err
    assert "middleware[0].auth.keys_file[2].key: environment variable NOT_SET_ANYWHERE" in err
    assert OTHER_KEY not in err

    (tmp_path / "keys.yaml").write_text(
        f"- id: good\n  key_sha256: {SHA}\n- id: good\n  key_sha256: {OTHER_SHA}\n"
    )
    assert main(["check", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "middleware[0].auth.keys_file[1].id: duplicate id 'good' (also at keys_file[0])" in err

    (tmp_path / "keys.yaml").write_text(f"- id: x\n  key: {OTHER_KEY}\n  scopes: [chat\n")
    assert main(["check", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "middleware[0].auth.keys_file: keys.yaml is not valid YAML at line" in err
    assert OTHER_KEY not in err

    (tmp_path / "keys.yaml").unlink()
    assert main(["check", "--config", str(cfg)]) == 2
    assert "middleware[0].auth.keys_file: cannot read keys.yaml" in capsys.readouterr().err


# --- scopes and models -----------------------------------------------------------


async def test_missing_scope_is_403_naming_it(make_proxy: ProxyFactory, backend: Backend) -> None:
    client = await make_proxy(AUTH, backend)
    resp = await client.post(
        "/v1/chat/completions", json=chat_body(), headers={"X-API-Key": OTHER_KEY}
    )
    assert resp.status == 403
    err = error_of(await resp.json())
    assert err["type"] == "permission_error"
    assert err["code"] == "missing_scope"
    assert "Missing scope: chat" in err["message"]
    # the sessions routes need sessions:read to list and sessions:write to delete
    resp = await client.delete("/v1/sessions/s1", headers={"X-API-Key": KEY})
    assert resp.status == 403
    assert "Missing scope: sessions:write" in error_of(await resp.json())["message"]
    resp = await client.get("/v1/sessions", headers={"X-API-Key": OTHER_KEY})
    assert resp.status == 403
    assert "Missing scope: sessions:read" in error_of(await resp.json())["message"]
    # with the scope, the request goes past auth (no sessions middleware here: 404)
    resp = await client.get("/v1/sessions", headers={"X-API-Key": KEY})
    assert resp.status == 404
    # passthrough routes need chat
    resp = await client.post(
        "/v1/embeddings", json={"input": "x"}, headers={"X-API-Key": OTHER_KEY}
    )
    assert resp.status == 403
    assert backend.seen == []


async def test_model_outside_the_allowlist_is_403_naming_it(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    text = auth_config(f"      - {{id: gpt-only, key: {KEY}, models: ['gpt-4o*']}}\n")
    client = await make_proxy(text, backend)
    resp = await client.post(
        "/v1/chat/completions", json=chat_body(model="llama3.1:8b"), headers={"X-API-Key": KEY}
    )
    assert resp.status == 403
    err = error_of(await resp.json())
    assert err["type"] == "permission_error"
    assert "llama3.1:8b" in err["message"]
    assert backend.seen == []
    resp = await client.post(
        "/v1/chat/completions", json=chat_body(model="gpt-4o-mini"), headers={"X-API-Key": KEY}
    )
    assert resp.status == 200
    assert backend.seen[-1].json()["model"] == "gpt-4o-mini"


HAS_OVERRIDE = importlib.util.find_spec("proxy.middleware.model_override") is not None
needs_override = pytest.mark.skipif(not HAS_OVERRIDE, reason="model_override is not there yet")


@needs_override
async def test_allowlist_applies_to_the_overridden_model(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    override = "  - type: model_override\n    model: llama3.1:8b\n"
    allowed = auth_config(f"      - {{id: k, key: {KEY}, models: ['llama*']}}\n", extra=override)
    client = await make_proxy(allowed, backend)
    resp = await client.post(
        "/v1/chat/completions", json=chat_body(model="gpt-4o"), headers={"X-API-Key": KEY}
    )
    assert resp.status == 200
    assert backend.seen[-1].json()["model"] == "llama3.1:8b"

    denied = auth_config(f"      - {{id: k, key: {KEY}, models: ['gpt-4o']}}\n", extra=override)
    client = await make_proxy(denied, backend)
    resp = await client.post(
        "/v1/chat/completions", json=chat_body(model="gpt-4o"), headers={"X-API-Key": KEY}
    )
    assert resp.status == 403
    assert "llama3.1:8b" in error_of(await resp.json())["message"]
    assert len(backend.seen) == 1


async def test_models_list_shows_only_what_the_key_may_use(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    backend.on("GET", "/v1/models", json_handler(MODELS))
    client = await make_proxy(AUTH, backend)
    resp = await client.get("/v1/models", headers={"X-API-Key": OTHER_KEY})
    assert resp.status == 200
    doc = await resp.json()
    assert doc["object"] == "list"
    assert [m["id"] for m in doc["data"]] == ["llama3.1:8b", "llama3.1:70b"]
    resp = await client.get("/v1/models", headers={"X-API-Key": KEY})
    assert [m["id"] for m in (await resp.json())["data"]] == [
        "llama3.1:8b",
        "llama3.1:70b",
        "gpt-4o",
    ]
    resp = await client.get("/v1/models")
    assert resp.status == 401
    assert all(KEY not in str(s.headers) and OTHER_KEY not in str(s.headers) for s in backend.seen)


@needs_override
async def test_models_list_judges_aliases_by_their_target(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    backend.on("GET", "/v1/models", json_handler(MODELS))
    text = auth_config(
        f"      - {{id: k, key: {KEY}, models: ['llama3.1:8b']}}\n",
        extra="  - type: model_override\n    aliases: {junis-orchestrator: llama3.1:8b, big: gpt-4o}\n",
    )
    client = await make_proxy(text, backend)
    resp = await client.get("/v1/models", headers={"X-API-Key": KEY})
    assert resp.status == 200
    ids = {m["id"] for m in (await resp.json())["data"]}
    assert ids == {"llama3.1:8b", "junis-orchestrator"}


# --- per-key settings for other middlewares ----------------------------------------


def identity_probe(options: dict[str, Any], ctx: BuildContext) -> Middleware:
    """A user's middleware that shows what auth put on the exchange."""

    async def probe(ex: Exchange, call_next: Handler) -> web.StreamResponse:
        ident = ex.identity
        assert ident is not None
        ex.response_headers["X-Probe"] = json.dumps(
            {
                "id": ident.id,
                "client_id": ex.client_id,
                "scopes": sorted(ident.scopes),
                "models": list(ident.models),
                "model": ident.model,
                "limits": ident.limits.model_dump() if ident.limits else None,
            }
        )
        return await call_next(ex)

    return probe


async def test_identity_carries_the_keys_limits_and_model(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    text = auth_config(
        f"      - id: tuned\n        key: {KEY}\n        scopes: [chat]\n"
        "        models: ['llama*']\n        model: llama3.1:8b\n"
        "        limits: {requests_per_minute: 600, max_concurrent: 2}\n"
        f"      - {{id: plain, key: {OTHER_KEY}}}\n",
        extra="  - type: tests.integration.test_auth:identity_probe\n",
    )
    client = await make_proxy(text, backend)
    body = chat_body(model="llama3.1:8b")
    resp = await client.post("/v1/chat/completions", json=body, headers={"X-API-Key": KEY})
    assert resp.status == 200
    assert json.loads(resp.headers["X-Probe"]) == {
        "id": "tuned",
        "client_id": "tuned",
        "scopes": ["chat"],
        "models": ["llama*"],
        "model": "llama3.1:8b",
        "limits": {"requests_per_minute": 600, "tokens_per_minute": None, "max_concurrent": 2},
    }
    resp = await client.post("/v1/chat/completions", json=body, headers={"X-API-Key": OTHER_KEY})
    assert json.loads(resp.headers["X-Probe"]) == {
        "id": "plain",
        "client_id": "plain",
        "scopes": ["chat", "models"],
        "models": ["*"],
        "model": None,
        "limits": None,
    }


# --- what never needs a key, and what never sees one --------------------------------


async def test_health_endpoints_need_no_key(make_proxy: ProxyFactory, backend: Backend) -> None:
    client = await make_proxy(AUTH, backend)
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200


async def test_key_never_reaches_backend_or_logs(
    make_proxy: ProxyFactory, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await make_proxy(AUTH, backend)
    requests: list[tuple[str, str, dict[str, str]]] = [
        ("POST", "/v1/chat/completions", {"X-API-Key": KEY}),
        ("POST", "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}),
        ("POST", "/v1/chat/completions", {"X-API-Key": KEY, "Authorization": f"Bearer {KEY}"}),
        ("GET", "/v1/models", {"X-API-Key": KEY}),
        ("POST", "/v1/embeddings", {"Authorization": f"Bearer {KEY}"}),
        ("POST", "/v1/chat/completions", {"X-API-Key": OTHER_KEY}),  # 403: scope
    ]
    statuses = []
    for method, path, headers in requests:
        body = chat_body() if path.endswith("completions") else {"input": "x"}
        resp = await client.request(
            method, path, json=None if method == "GET" else body, headers=headers
        )
        statuses.append(resp.status)
        assert KEY not in await resp.text()
    assert statuses == [200, 200, 200, 200, 404, 403]
    assert len(backend.seen) == 5
    for seen in backend.seen:
        assert "Authorization" not in seen.headers
        assert "X-API-Key" not in seen.headers
        assert KEY not in str(seen.headers) and KEY.encode() not in seen.body
        assert seen.headers["X-Request-Id"]
    text = log_text(caplog.records)
    assert KEY not in text and OTHER_KEY not in text
    access = [r for r in caplog.records if r.name == "chat_proxy.access"]
    assert [getattr(r, "key_id", "?") for r in access] == ["web-app"] * 5 + ["lister"]


# --- the OpenAI Python SDK (Bearer) --------------------------------------------------


async def test_openai_sdk_bearer(make_proxy: ProxyFactory, backend: Backend) -> None:
    backend.on("GET", "/v1/models", json_handler(MODELS))
    client = await make_proxy(AUTH, backend)
    base = str(client.make_url("/v1"))
    messages: Any = [{"role": "user", "content": "Hi"}]

    async with openai.AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0) as sdk:
        done = await sdk.chat.completions.create(model="test-model", messages=messages)
        assert done.choices[0].message.content == "Hello!"

    async with openai.AsyncOpenAI(base_url=base, api_key="sk-wrong", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError) as bad:
            await sdk.chat.completions.create(model="test-model", messages=messages)
        assert bad.value.status_code == 401
        assert bad.value.code == "invalid_api_key"

    async with openai.AsyncOpenAI(base_url=base, api_key=OTHER_KEY, max_retries=0) as sdk:
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await sdk.chat.completions.create(model="test-model", messages=messages)
        assert "Missing scope: chat" in denied.value.message
        listed = [m.id async for m in sdk.models.list()]
        assert listed == ["llama3.1:8b", "llama3.1:70b"]
    assert len(backend.seen) == 2  # the successful completion and the models list


# --- keys new ------------------------------------------------------------------------


async def test_keys_new_prints_a_key_and_an_entry_that_work(
    make_proxy: ProxyFactory, backend: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "new", "--id", "ci-bot", "--scopes", "chat,models"]) == 0
    out = capsys.readouterr().out
    match = re.search(r"^key \(shown once, store it now\): (\S+)$", out, re.M)
    assert match is not None
    key = match.group(1)
    entry = out[out.index("\n- id:") + 1 :]
    assert key not in entry
    assert f"key_sha256: {hashlib.sha256(key.encode()).hexdigest()}" in entry
    indented = "".join(f"    {line}\n" for line in entry.splitlines())
    client = await make_proxy(
        BASIC + "middleware:\n  - type: auth\n    keys:\n" + indented, backend
    )
    resp = await client.post("/v1/chat/completions", json=chat_body(), headers={"X-API-Key": key})
    assert resp.status == 200
    resp = await client.get("/v1/sessions", headers={"X-API-Key": key})
    assert resp.status == 403

    assert main(["keys", "new", "--id", "ci-bot"]) == 0
    second = capsys.readouterr().out
    assert key not in second  # a fresh key each time


def test_keys_new_refuses_unknown_scopes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new", "--id", "x", "--scopes", "chat,root"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "unknown scope root" in captured.err
    assert main(["keys", "new", "--id", "x", "--scopes", ","]) == 2
    assert "no scope given" in capsys.readouterr().err


# --- start-up warning without auth -----------------------------------------------------


def test_is_loopback() -> None:
    from proxy.server import _is_loopback

    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert _is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "example.com", ""):
        assert not _is_loopback(host), host


async def _serve_until_up(text: str, backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the server's start-up path as if bound beyond loopback (it is bound on
    127.0.0.1 only), then stop it as SIGTERM would."""
    from proxy import server

    handlers: dict[int, Callable[[], object]] = {}
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "add_signal_handler", lambda sig, cb: handlers.__setitem__(sig, cb))
    monkeypatch.setattr(server, "_is_loopback", lambda host: False)
    config = config_from(text, backend)
    task = asyncio.create_task(server._run(config, "127.0.0.1", 0, False, path=None))
    for _ in range(500):
        if signal.SIGTERM in handlers or task.done():
            break
        await asyncio.sleep(0.01)
    handlers[signal.SIGTERM]()
    await asyncio.wait_for(task, 10)


async def test_startup_warns_beyond_loopback_without_auth(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chat_proxy")
    await _serve_until_up(BASIC, backend, monkeypatch)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "no auth middleware" in warnings[0].getMessage()
    caplog.clear()
    await _serve_until_up(AUTH, backend, monkeypatch)
    assert [r for r in caplog.records if r.levelno == logging.WARNING] == []
    assert any(r.getMessage() == "chat-proxy listening" for r in caplog.records)
