"""Secrets: no API key (nor its SHA-256) is ever in a log line, in /metrics, in a
response body or sent to the backend, whatever goes wrong; and one key never sees,
reads or deletes another key's sessions."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.fixtures import DONE, Backend, ProxyFactory, chunk, completion
from tests.hardening.fixtures import (
    KEYS,
    ProxyProcess,
    assert_openai_error,
    free_port,
    full_chain,
    sqlite_store,
)

CHAT = "/v1/chat/completions"


def secrets() -> dict[str, str]:
    """Every string that must not leak: each key and its SHA-256 hex digest."""
    out: dict[str, str] = {}
    for name, key in KEYS.items():
        out[f"{name} key"] = key
        out[f"{name} sha256"] = hashlib.sha256(key.encode()).hexdigest()
    return out


def leaks(text: str) -> list[str]:
    lowered = text.lower()
    return [name for name, value in secrets().items() if value.lower() in lowered]


async def scripted(request: web.Request) -> web.StreamResponse:
    """A backend whose answer depends on the model: errors of every kind, and an echo
    of the headers it received (which would show a forwarded key)."""
    doc = await request.json()
    model = doc.get("model")
    seen = {k: v for k, v in request.headers.items()}
    if model == "fail-500":
        return web.json_response({"error": {"message": f"boom; headers were {seen}"}}, status=500)
    if model == "fail-429":
        return web.json_response(
            {"error": {"message": f"busy; headers were {seen}"}},
            status=429,
            headers={"Retry-After": "0"},
        )
    if model == "fail-400":
        return web.json_response({"detail": f"bad; headers were {seen}"}, status=400)
    if model == "bad-json":
        return web.Response(
            body=b"{not json " + json.dumps(seen).encode(), content_type="application/json"
        )
    if model == "broken-stream":
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk(json.dumps(seen)))
        assert request.transport is not None
        request.transport.abort()
        return resp
    if doc.get("stream"):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk("goodbye " + json.dumps(seen)) + chunk(finish="stop") + DONE)
        await resp.write_eof()
        return resp
    return web.json_response(completion("hello " + json.dumps(seen)))


async def raw_exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_no_key_in_logs_metrics_bodies_or_upstream(backend: Backend, tmp_path: Path) -> None:
    backend.chat(scripted)
    config = full_chain(
        backend.url,
        sqlite_store(tmp_path / "s.db"),
        extra_server="log_level: debug",
        timeouts="{connect: 1, first_byte: 3, idle: 3}",
    )
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(config)
    proxy = ProxyProcess(cfg, free_port(), tmp_path / "proxy.log")
    # started in a thread: the backend answers from this test's event loop meanwhile
    await asyncio.to_thread(proxy.start)
    bodies: list[bytes] = []
    statuses: dict[str, set[int]] = {}
    alice, bob, carol = KEYS["alice"], KEYS["bob"], KEYS["carol"]
    ways = {
        "alice": {"X-API-Key": alice},
        "bob": {"Authorization": f"Bearer {bob}"},
        "carol": {"Authorization": f"bearer {carol}", "X-API-Key": carol},
    }
    try:
        async with aiohttp.ClientSession(proxy.url) as http:

            async def send(what: str, method: str, path: str, **kw: Any) -> int:
                async with http.request(method, path, **kw) as resp:
                    body = await resp.read()
                bodies.append(body)
                statuses.setdefault(what, set()).add(resp.status)
                if resp.status >= 400 and resp.content_type == "application/json":
                    assert_openai_error(body, resp.status)
                return resp.status

            for name in ("alice", "bob"):
                headers = ways[name]
                for model in (
                    "test-model",
                    "fail-500",
                    "fail-429",
                    "fail-400",
                    "bad-json",
                    "broken-stream",
                ):
                    for stream in (False, True):
                        doc = {
                            "model": model,
                            "stream": stream,
                            "messages": [{"role": "user", "content": "hi"}],
                        }
                        await send(model, "POST", CHAT, json=doc, headers=headers)
                await send("bad json", "POST", CHAT, data=b"{oops", headers=headers)
                await send(
                    "bad param",
                    "POST",
                    CHAT,
                    json={"model": "x", "messages": [], "n": -1},
                    headers=headers,
                )
                await send("models", "GET", "/v1/models", headers=headers)
                await send("sessions", "GET", "/v1/sessions", headers=headers)  # bob: 403
                await send(
                    "passthrough", "POST", "/v1/embeddings", json={"input": "x"}, headers=headers
                )
                await send("query key", "GET", f"/v1/models?api_key={KEYS[name]}", headers=headers)
            for _ in range(5):  # carol: 3 a minute, then 429
                await send(
                    "carol",
                    "POST",
                    CHAT,
                    json={"model": "test-model", "messages": [{"role": "user", "content": "x"}]},
                    headers=ways["carol"],
                )
            # keys that are nearly right, in both places
            for key in (alice + "x", alice[:-1], alice.upper(), f"{alice} {bob}"):
                await send("wrong key", "POST", CHAT, json={}, headers={"X-API-Key": key})
                await send(
                    "wrong key", "POST", CHAT, json={}, headers={"Authorization": f"Bearer {key}"}
                )
            await send("no key", "POST", CHAT, json={})
            await send("metrics", "GET", "/metrics")
            metrics_text = bodies[-1].decode()
        # a key in a header the HTTP parser refuses (a stray control character)
        for line in (f"Authorization: Bearer {alice}\x01", f"X-API-Key: {bob}\rx"):
            await raw_exchange(
                proxy.port,
                f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n".encode()
                + line.encode()
                + b"\r\nContent-Length: 2\r\n\r\n{}",
            )
    finally:
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proxy.proc.wait, 20)
    log = proxy.log_text()

    # the traffic really went through every path that could leak
    assert statuses["test-model"] == {200}
    assert statuses["fail-500"] == {502}
    assert 429 in statuses["fail-429"]
    assert statuses["sessions"] == {200, 403}
    assert 429 in statuses["carol"]
    assert statuses["wrong key"] == {401}
    lines = log.splitlines()
    docs = [json.loads(x) for x in lines if x.startswith("{")]
    access = [d for d in docs if d.get("logger") == "chat_proxy.access"]
    assert {a.get("key_id") for a in access} >= {"alice", "bob", "carol"}
    assert any("malformed HTTP request" in d["msg"] for d in docs)
    assert {"debug", "warning"} & {d["level"] for d in docs}

    for i, line in enumerate(lines):
        assert not leaks(line), (leaks(line), f"log line {i}", line[:500])
    assert not leaks(metrics_text), leaks(metrics_text)
    for body in bodies:
        # the stand-in backend writes what it received into its answers
        assert not leaks(body.decode("utf-8", "replace")), body[:500]
    for seen in backend.seen:
        assert not leaks(json.dumps(dict(seen.headers)) + seen.body.decode("utf-8", "replace"))


# -- sessions of one key are never another's --


async def test_sessions_are_private_to_their_key(
    make_proxy: ProxyFactory, backend: Backend, tmp_path: Path
) -> None:
    backend.chat(scripted)
    client = await make_proxy(full_chain("{backend}", sqlite_store(tmp_path / "s.db")), backend)
    alice = {"Authorization": f"Bearer {KEYS['alice']}"}
    dave = {"X-API-Key": KEYS["dave"]}

    async def chat(
        headers: dict[str, str], messages: list[dict[str, Any]], sid: str | None = None
    ) -> tuple[str, str]:
        h = dict(headers)
        if sid:
            h["X-Session-Id"] = sid
        resp = await client.post(
            CHAT, json={"model": "test-model", "messages": messages}, headers=h
        )
        assert resp.status == 200
        doc = await resp.json()
        return resp.headers["X-Session-Id"], doc["choices"][0]["message"]["content"]

    async def get(path: str, headers: dict[str, str]) -> tuple[int, Any]:
        resp = await client.get(path, headers=headers)
        return resp.status, await resp.json()

    # alice: a session she names, and one found by matching
    await chat(alice, [{"role": "user", "content": "alice's secret plan"}], "shared-name")
    history = [{"role": "user", "content": "alice talks"}]
    auto, reply = await chat(alice, history)
    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "more"}]
    assert (await chat(alice, history))[0] == auto

    # dave sees none of them
    status, listing = await get("/v1/sessions?limit=100", dave)
    assert status == 200 and listing["data"] == []
    status, unknown = await get("/v1/sessions/no-such-session", dave)
    for sid in ("shared-name", auto):
        status, doc = await get(f"/v1/sessions/{sid}", dave)
        assert status == 404
        # exactly like a session that does not exist
        assert doc == {
            **unknown,
            "error": {
                **unknown["error"],
                "message": unknown["error"]["message"].replace("no-such-session", sid),
            },
        }
        resp = await client.delete(f"/v1/sessions/{sid}", headers=dave)
        assert resp.status == 404
        status, _ = await get(f"/v1/sessions?after={sid}", dave)
        assert status == 400  # not a cursor of his either

    # dave's own conversation never continues alice's, even word for word
    dave_sid, _ = await chat(dave, history)
    assert dave_sid != auto
    # the same name is a separate session per key
    assert (await chat(dave, [{"role": "user", "content": "dave's"}], "shared-name"))[
        0
    ] == "shared-name"
    status, doc = await get("/v1/sessions/shared-name", dave)
    assert status == 200 and doc["key_id"] == "dave" and doc["turn_count"] == 1
    assert "alice" not in json.dumps(doc)
    resp = await client.delete("/v1/sessions/shared-name", headers=dave)
    assert resp.status == 200

    # alice's sessions are untouched
    status, doc = await get("/v1/sessions/shared-name", alice)
    assert status == 200 and doc["key_id"] == "alice" and doc["turn_count"] == 1
    assert doc["turns"][0]["messages"][0]["content"] == "alice's secret plan"
    status, doc = await get(f"/v1/sessions/{auto}", alice)
    assert status == 200 and doc["turn_count"] == 2
    status, listing = await get("/v1/sessions?limit=100", alice)
    assert {s["id"] for s in listing["data"]} == {"shared-name", auto}
    status, listing = await get("/v1/sessions?limit=100", dave)
    assert {s["id"] for s in listing["data"]} == {dave_sid}
