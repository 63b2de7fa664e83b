"""curl as the client: the README's quick start against config/demo.yaml (the whole
chain in front of echo), and plain requests to the proxy in front of the real
llama.cpp server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

try:
    from .llama_server import LlamaBackend
except ImportError:
    from llama_server import LlamaBackend

from tests.fixtures import ProxyFactory

ROOT = Path(__file__).resolve().parents[2]
Curl = Any  # the `curl` fixture (tests/e2e/conftest.py)
JSON = ("-H", "Content-Type: application/json")


def data_payloads(raw: bytes) -> list[str]:
    out: list[str] = []
    for event in raw.decode("utf-8").split("\n\n"):
        data = [line[5:].lstrip(" ") for line in event.split("\n") if line.startswith("data:")]
        if data:
            out.append("\n".join(data))
    return out


def streamed(raw: bytes) -> tuple[str, str | None, list[dict[str, Any]]]:
    """(text of choice 0, its last finish_reason, the chunks) of a whole stream."""
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    chunks = [json.loads(p) for p in data_payloads(raw)[:-1]]
    text = ""
    finish = None
    for c in chunks:
        for choice in c.get("choices") or ():
            text += choice["delta"].get("content") or ""
            finish = choice.get("finish_reason") or finish
    return text, finish, chunks


async def test_readme_quick_start(make_proxy: ProxyFactory, curl: Curl) -> None:
    client = await make_proxy((ROOT / "config" / "demo.yaml").read_text())
    url = str(client.make_url("/v1/chat/completions"))
    auth = ("-H", "Authorization: Bearer demo-key")

    got = await curl.run(
        url,
        *auth,
        *JSON,
        "-d",
        '{"model":"demo","messages":[{"role":"user","content":"hello there"}]}',
    )
    assert got.status == 200, got.body
    doc = json.loads(got.body)
    assert doc["choices"][0]["message"]["content"] == "You said: hello there"
    sid = got.headers["x-session-id"]

    got = await curl.run(
        url,
        "-N",
        *auth,
        *JSON,
        "-d",
        '{"stream":true,"messages":[{"role":"user","content":"hello there"}]}',
    )
    assert got.status == 200
    assert got.headers["content-type"] == "text/event-stream"
    text, finish, _ = streamed(got.body)
    assert (text, finish) == ("You said: hello there", "stop")

    got = await curl.run(
        url,
        *auth,
        *JSON,
        "-d",
        '{"messages":[{"role":"user","content":"ok goodbye"}],\n'
        '       "tools":[{"type":"function","function":{"name":"end_call"}}]}',
    )
    choice = json.loads(got.body)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "end_call"

    got = await curl.run(str(client.make_url("/v1/sessions")), *auth)
    listing = json.loads(got.body)
    assert listing["object"] == "list"
    assert sid in [s["id"] for s in listing["data"]]
    assert len(listing["data"]) == 3

    got = await curl.run(url, *JSON, "-d", '{"messages":[{"role":"user","content":"hi"}]}')
    assert got.status == 401
    assert json.loads(got.body)["error"]["type"] == "authentication_error"


LLAMA = """
upstreams:
  - name: llama
    url: {llama}
    timeouts: {connect: 2, first_byte: 20, idle: 20}
middleware:
  - type: auth
    keys:
      - id: curl
        key: sk-curl-0123456789abcdef
"""


async def test_llama_through_the_proxy(
    llama_proxy: ProxyFactory, llama_backend: LlamaBackend, curl: Curl
) -> None:
    client = await llama_proxy(LLAMA)
    url = str(client.make_url("/v1/chat/completions"))
    key = ("-H", "X-API-Key: sk-curl-0123456789abcdef")
    request = {
        "model": llama_backend.model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
        "temperature": 0,
    }

    got = await curl.run(url, *key, *JSON, "-d", json.dumps(request))
    assert got.status == 200, got.body
    doc = json.loads(got.body)
    assert doc["usage"]["completion_tokens"] == 8
    assert doc["choices"][0]["finish_reason"] == "length"
    content = doc["choices"][0]["message"]["content"]

    got = await curl.run(url, "-N", *key, *JSON, "-d", json.dumps({**request, "stream": True}))
    assert got.status == 200
    assert got.headers["content-type"] == "text/event-stream"
    assert got.headers["x-accel-buffering"] == "no"
    text, finish, chunks = streamed(got.body)
    assert text == content  # greedy decoding: the same reply streamed
    assert finish == "length"
    assert {c["model"] for c in chunks} == {llama_backend.model}

    got = await curl.run(str(client.make_url("/v1/models")), *key)
    assert [m["id"] for m in json.loads(got.body)["data"]] == [llama_backend.model]
