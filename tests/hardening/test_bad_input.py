"""Bad input at the HTTP level, much of it generated: every answer is a 2xx or a 4xx,
errors have the OpenAI shape, no body shows a traceback, and the proxy keeps serving.

One proxy (the whole chain on SQLite, in front of `echo:`) serves the whole module
from a thread of its own, so that each generated example is one plain HTTP exchange
with bytes exactly as written here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.entry import MAX_JSON_DEPTH
from proxy.sessions.ids import SAFE_ID
from tests.hardening.fixtures import (
    ALICE,
    KEYS,
    Reply,
    ThreadedProxy,
    assert_no_traceback,
    assert_openai_error,
    assert_serving,
    build_request,
    chat,
    full_chain,
    raw_request,
    request,
    sqlite_store,
)

CHAT = "/v1/chat/completions"


def examples(n: int) -> settings:
    """n examples; HARDENING_SCALE=10 runs ten times as many (a longer hunt)."""
    return settings(
        max_examples=n * int(os.environ.get("HARDENING_SCALE", "1")),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    db: Path = tmp_path_factory.mktemp("bad-input") / "sessions.db"
    proxy = ThreadedProxy(full_chain("echo:", sqlite_store(db))).start()
    try:
        yield proxy.port
        assert_serving(proxy.port)
    finally:
        proxy.stop()


def check(reply: Reply, *, parser_may_refuse: bool = False) -> None:
    """A 2xx with a chat answer, or a 4xx in the OpenAI shape; never a 5xx.

    `parser_may_refuse`: bytes that are not valid HTTP may be refused by the HTTP
    parser itself, before the proxy sees a request: a 400 in the same shape, code
    `invalid_http` (and only then)."""
    assert reply.status < 500, reply.body[:1000]
    assert_no_traceback(reply.body)
    if reply.status >= 400:
        assert reply.content_type.startswith("application/json"), reply.content_type
        error = assert_openai_error(reply.body, reply.status)
        if error.get("code") == "invalid_http":
            assert parser_may_refuse and reply.status == 400, reply.body[:500]
        return
    assert 200 <= reply.status < 300
    if reply.content_type.startswith("text/event-stream"):
        assert reply.body.endswith(b"data: [DONE]\n\n"), reply.body[-300:]
        for block in reply.body.split(b"\n\n"):
            if block.startswith(b"data: {"):
                doc = json.loads(block[6:])
                assert "error" not in doc, doc
        return
    doc = json.loads(reply.body)
    assert isinstance(doc, dict)


# -- generated JSON --

_text = st.one_of(
    st.text(max_size=40),
    # lone surrogates: json.dumps writes them as \ud800 escapes
    st.text(
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"]), max_size=3
    ),
    st.sampled_from(["", " ", "\x00", "\r\n", "null", "\u202e", "🙂", "a" * 300]),
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # NaN and the infinities too: Python's json writes and reads them
    _text,
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_text, inner, max_size=4)),
    max_leaves=12,
)

TOP_FIELDS = [
    "model",
    "messages",
    "stream",
    "temperature",
    "top_p",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "user",
    "user_id",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "seed",
    "stream_options",
    "functions",
    "function_call",
    "metadata",
    "elevenlabs_extra_body",
    "top_k",
]
MESSAGE_FIELDS = ["role", "content", "name", "tool_calls", "tool_call_id", "function_call"]


def dumps(value: Any) -> bytes:
    # allow_nan: NaN and Infinity go out as the bare words, as a careless client sends them
    return json.dumps(value, allow_nan=True).encode()


@examples(120)
@given(body=json_values)
def test_any_json_document_as_the_body(port: int, body: Any) -> None:
    check(request(port, "POST", CHAT, dumps(body)))


@examples(250)
@given(field=st.sampled_from(TOP_FIELDS), value=json_values, stream=st.booleans())
def test_any_json_value_in_each_field(port: int, field: str, value: Any, stream: bool) -> None:
    body = chat("hello there", stream=stream)
    body[field] = value
    check(request(port, "POST", CHAT, dumps(body)))


@examples(200)
@given(
    field=st.sampled_from(MESSAGE_FIELDS),
    value=json_values,
    role=st.sampled_from(["user", "assistant", "system", "tool", "developer"]),
    history=st.booleans(),
)
def test_any_json_value_in_each_message_field(
    port: int, field: str, value: Any, role: str, history: bool
) -> None:
    message: dict[str, Any] = {"role": role, "content": "some text"}
    message[field] = value
    messages: list[Any] = [message]
    if history:  # a conversation, so that session matching reads every message
        messages = [
            {"role": "user", "content": "first"},
            message,
            {"role": "assistant", "content": "a reply"},
            {"role": "user", "content": "next"},
        ]
    check(request(port, "POST", CHAT, dumps({"model": "test-model", "messages": messages})))


@examples(80)
@given(messages=st.lists(json_values, max_size=6))
def test_any_list_of_messages(port: int, messages: list[Any]) -> None:
    check(request(port, "POST", CHAT, dumps({"model": "test-model", "messages": messages})))


# -- bytes that are not JSON, or not UTF-8 --


CONTENT_TYPES = [
    b"application/json",
    b"application/json; charset=utf-16",
    b"text/plain",
    b"application/x-www-form-urlencoded",
    b"multipart/form-data; boundary=xyz",
    b"application/octet-stream",
    b"",
    b"\xff\xfe/\x00",
    None,
]


@examples(120)
@given(body=st.binary(max_size=3000), ctype=st.sampled_from(CONTENT_TYPES))
def test_binary_bodies_and_content_types(port: int, body: bytes, ctype: bytes | None) -> None:
    check(request(port, "POST", CHAT, body, content_type=ctype), parser_may_refuse=True)
    check(request(port, "POST", "/v1/embeddings", body, content_type=ctype), parser_may_refuse=True)


@examples(60)
@given(junk=st.binary(min_size=1, max_size=12), where=st.sampled_from(["content", "model", "key"]))
def test_invalid_utf8_inside_json(port: int, junk: bytes, where: str) -> None:
    template = {
        "content": b'{"model":"test-model","messages":[{"role":"user","content":"a\x01b"}]}',
        "model": b'{"model":"\x01","messages":[{"role":"user","content":"hi"}]}',
        "key": b'{"model":"test-model","\x01":1,"messages":[{"role":"user","content":"hi"}]}',
    }[where]
    body = template.replace(b"\x01", junk.replace(b'"', b"").replace(b"\\", b""))
    check(request(port, "POST", CHAT, body))


def test_valid_chat_in_other_content_types_and_encodings(port: int) -> None:
    doc = chat("plain")
    for ctype in CONTENT_TYPES:
        reply = request(port, "POST", CHAT, json.dumps(doc).encode(), content_type=ctype)
        check(reply, parser_may_refuse=ctype is not None and b"\x00" in ctype)
        # the chat route reads JSON whatever the declared type (the parser refuses a
        # NUL in a header)
        assert reply.status == 200 or b"\x00" in (ctype or b"")
    for encoding in ("utf-8-sig", "utf-16", "utf-32"):
        reply = request(port, "POST", CHAT, json.dumps(doc).encode(encoding))
        check(reply)
    # a lone surrogate is refused with a 400, a real pair (an emoji) is fine
    lone = b'{"model":"test-model","messages":[{"role":"user","content":"x\\udc00y"}]}'
    reply = request(port, "POST", CHAT, lone)
    assert reply.status == 400 and assert_openai_error(reply.body, 400)["code"] == "invalid_json"
    pair = b'{"model":"test-model","messages":[{"role":"user","content":"\\ud83d\\ude42"}]}'
    reply = request(port, "POST", CHAT, pair)
    assert reply.status == 200 and reply.json()["choices"][0]["message"]["content"].endswith("🙂")


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


@pytest.mark.parametrize("depth", [2, MAX_JSON_DEPTH - 3, MAX_JSON_DEPTH + 1, 900, 990, 100_000])
def test_deep_nesting_everywhere(port: int, depth: int) -> None:
    deep = _nested(depth)
    user = b'{"role":"user","content":"hi"}'
    bodies = {
        "root": deep,
        "extra param": b'{"model":"test-model","messages":[' + user + b'],"zz":' + deep + b"}",
        "metadata": b'{"model":"test-model","messages":['
        + user
        + b'],"metadata":{"a":'
        + deep
        + b"}}",
        "tool schema": b'{"model":"test-model","messages":[' + user + b'],"tools":[{"type":'
        b'"function","function":{"name":"f","parameters":{"type":"object","x":' + deep + b"}}}]}",
        "content": b'{"model":"test-model","messages":[{"role":"user","content":' + deep + b"}]}",
        "message field": b'{"model":"test-model","messages":[{"role":"user","content":"hi","x":'
        + deep
        + b"}]}",
        "elevenlabs": b'{"model":"test-model","messages":[' + user + b'],"elevenlabs_extra_body":'
        b'{"x":' + deep + b"}}",
        # a JSON text inside a string, parsed by session matching
        "tool arguments": b'{"model":"test-model","messages":[' + user + b',{"role":"assistant",'
        b'"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"'
        + deep
        + b'"}}]},{"role":"tool","tool_call_id":"c1","content":"ok"}]}',
    }
    for name, body in bodies.items():
        reply = request(port, "POST", CHAT, body)
        check(reply)
        if depth > MAX_JSON_DEPTH and name != "tool arguments":
            assert reply.status == 400, (name, reply.body[:300])
            assert reply.json()["error"]["code"] == "invalid_json"


def test_huge_strings(port: int) -> None:
    big = "x" * 900_000  # under the echo upstream's own 1 MiB limit
    reply = request(port, "POST", CHAT, chat(big))
    assert reply.status == 200
    assert len(reply.json()["choices"][0]["message"]["content"]) == len("You said: ") + len(big)
    for field in ("model", "user", "zz"):
        check(request(port, "POST", CHAT, chat("hi", **{field: big})))
    check(request(port, "POST", CHAT, {"model": "m", big: 1, "messages": []}))
    # over max_body_bytes (2 MiB): 413, by Content-Length and when sent chunked
    reply = request(port, "POST", CHAT, chat("y" * 3_000_000))
    assert (
        reply.status == 413 and assert_openai_error(reply.body, 413)["code"] == "request_too_large"
    )
    body = json.dumps(chat("z" * 3_000_000)).encode()
    chunks = b"".join(
        b"%x\r\n" % len(body[i : i + 65536]) + body[i : i + 65536] + b"\r\n"
        for i in range(0, len(body), 65536)
    )
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + ALICE.encode()
        + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
    )
    reply = raw_request(port, head + chunks + b"0\r\n\r\n")
    assert reply.status == 413, reply.body[:300]
    assert_openai_error(reply.body, 413)


# -- headers --


def test_oversized_repeated_and_conflicting_headers(port: int) -> None:
    body = json.dumps(chat("headers")).encode()

    def send(headers: list[tuple[bytes, bytes]], **kw: Any) -> Reply:
        return raw_request(port, build_request("POST", CHAT, body, headers, **kw))

    for size in (4_000, 8_000, 9_000, 70_000):
        check(send([(b"X-Filler", b"f" * size)]), parser_may_refuse=True)
        check(send([(b"X-" + b"n" * size, b"v")]), parser_may_refuse=True)
    check(send([(b"X-Many-%d" % i, b"v") for i in range(150)]), parser_may_refuse=True)
    reply = send([(b"X-Request-Id", b"a"), (b"X-Request-Id", b"b")])
    assert reply.status == 200
    reply = send([(b"X-Session-Id", b"one"), (b"X-Session-Id", b"two")])
    assert reply.status == 200 and reply.headers["X-Session-Id"] in ("one", "two")
    # two keys at once: one of them decides, and it is a valid one
    reply = send([(b"X-API-Key", KEYS["bob"].encode())])
    assert reply.status == 200
    reply = send([(b"X-API-Key", b"wrong"), (b"X-API-Key", KEYS["bob"].encode())], key=None)
    check(reply)
    # a second Content-Type: the HTTP parser refuses it
    check(send([(b"Content-Type", b"text/plain")]), parser_may_refuse=True)
    conflicting = build_request("POST", CHAT, body).replace(
        b"Content-Length:", b"Content-Length: 3\r\nContent-Length:"
    )
    check(raw_request(port, conflicting), parser_may_refuse=True)
    assert_serving(port)


ODD_IDS = [
    "../../etc/passwd",
    "..",
    ".",
    "../sessions",
    "' OR 1=1 --",
    "'; DROP TABLE sessions; --",
    '" OR ""="',
    "a\r\nX-Injected: 1",
    "a\nb",
    "a\x00b",
    "\x00",
    "ключ-сессии",
    "🙂",
    "\u202eevil",
    "%00",
    "%2e%2e%2f",
    "a" * 129,
    "a" * 10_000,
    " padded ",
    "*",
    "sess_*",
]


@examples(150)
@given(
    value=st.one_of(
        st.sampled_from(ODD_IDS).map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.binary(max_size=200),
        st.text(max_size=150).map(str.encode),
    )
)
def test_odd_session_ids_in_the_header(port: int, value: bytes) -> None:
    reply = raw_request(
        port,
        build_request("POST", CHAT, json.dumps(chat("sid")).encode(), [(b"X-Session-Id", value)]),
    )
    check(reply, parser_may_refuse=True)
    if reply.status == 200:
        sid = reply.headers["X-Session-Id"]
        assert "\r" not in sid and "\n" not in sid
        assert len(sid) <= 128


@examples(120)
@given(
    value=st.one_of(
        st.sampled_from(ODD_IDS),
        st.text(max_size=200),
        st.text(
            st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"]), max_size=2
        ),
    ),
    method=st.sampled_from(["GET", "DELETE"]),
    raw=st.booleans(),
)
def test_odd_session_ids_in_the_path(port: int, value: str, method: str, raw: bool) -> None:
    encoded = value.encode("utf-8", "surrogatepass")
    target = (
        b"/v1/sessions/" + encoded.replace(b" ", b"%20")
        if raw
        else ("/v1/sessions/" + quote(value, safe="", errors="surrogatepass")).encode()
    )
    reply = raw_request(port, build_request(method, target))
    check(reply, parser_may_refuse=True)
    if raw:  # bytes such as CR LF end the target early: any path may be what arrives
        return
    if reply.status == 200:  # the listing, or a session an earlier example named so
        doc = reply.json()
        assert doc["object"] == "list" if value == "" else doc["id"] == value
        assert value == "" or SAFE_ID.match(value)
    else:
        assert reply.status in (400, 404, 405), (reply.status, reply.body[:300])


def test_sql_and_traversal_ids_touch_no_other_session(port: int) -> None:
    reply = request(port, "POST", CHAT, chat("keep me"))
    assert reply.status == 200
    sid = reply.headers["X-Session-Id"]
    odd = [*ODD_IDS[:8], sid + "' OR '1'='1", sid + "%", "%", "%%", "*"]
    for value in [v for v in odd if not SAFE_ID.match(v)]:  # ids no session can have
        target = "/v1/sessions/" + quote(value, safe="")
        for method in ("DELETE", "GET"):
            reply = raw_request(port, build_request(method, target))
            check(reply, parser_may_refuse=True)
            assert reply.status in (400, 404)
    listing = request(port, "GET", "/v1/sessions?limit=100")
    assert listing.status == 200
    assert sid in [s["id"] for s in listing.json()["data"]]
    reply = request(port, "GET", f"/v1/sessions/{sid}")
    assert reply.status == 200 and reply.json()["turn_count"] == 1
    for query in (
        "limit=0",
        "limit=-1",
        "limit=1e3",
        "limit=%00",
        "after=%27%20OR%201=1",
        "after=%FF",
    ):
        reply = request(port, "GET", f"/v1/sessions?{query}")
        assert reply.status == 400, query
        assert_openai_error(reply.body, 400)


@examples(150)
@given(
    value=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=100).map(str.encode),
        st.sampled_from(
            [
                b"",
                b" ",
                b"k" * 8_000,
                b"k" * 20_000,
                "ключ".encode(),
                b"\xff\xfe",
                b"a\r\nX-Injected: 1",
                b"a\x00b",
                ALICE.encode() + b"\x01",
                ALICE.encode()[:-1],
                ALICE.upper().encode(),
            ]
        ),
    ),
    how=st.sampled_from(["x-api-key", "bearer", "bearer-lower", "basic", "bare"]),
)
def test_odd_api_keys(port: int, value: bytes, how: str) -> None:
    header = {
        "x-api-key": (b"X-API-Key", value),
        "bearer": (b"Authorization", b"Bearer " + value),
        "bearer-lower": (b"authorization", b"bearer " + value),
        "basic": (b"Authorization", b"Basic " + value),
        "bare": (b"Authorization", value),
    }[how]
    body = json.dumps(chat("key")).encode()
    reply = raw_request(port, build_request("POST", CHAT, body, [header], key=None))
    check(reply, parser_may_refuse=True)
    if reply.status != 400:
        assert reply.status == 401, (reply.status, reply.body[:200])
        assert "WWW-Authenticate" in reply.headers


def test_empty_and_spaced_bearer(port: int) -> None:
    body = json.dumps(chat("key")).encode()
    for value in (b"Bearer", b"Bearer ", b"Bearer    ", b"Bearer\t", b"Token " + ALICE.encode()):
        reply = raw_request(
            port, build_request("POST", CHAT, body, [(b"Authorization", value)], key=None)
        )
        assert reply.status == 401, value
        assert_openai_error(reply.body, 401)
    # extra spaces around a valid key are tolerated
    reply = raw_request(
        port,
        build_request(
            "POST",
            CHAT,
            body,
            [(b"Authorization", b"Bearer   " + ALICE.encode() + b"  ")],
            key=None,
        ),
    )
    assert reply.status == 200


def test_methods_and_paths(port: int) -> None:
    for method in ("GET", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"):
        reply = raw_request(port, build_request(method, CHAT))
        assert reply.status in (404, 405), method
        if method != "HEAD":
            assert_openai_error(reply.body, reply.status)
    for path in (
        "/",
        "/v2/chat",
        "/v1",
        "/v1/",
        "/v1//chat/completions",
        "/%2e%2e/etc/passwd",
        "/v1/chat/completions/../../models",
        "/v1/models?x=%00",
    ):
        reply = raw_request(port, build_request("GET", path))
        check(reply, parser_may_refuse=True)
    check(
        raw_request(port, b"BREW /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n"),
        parser_may_refuse=True,
    )
    check(raw_request(port, b"GET /v1/models HTTP/9.9\r\nHost: x\r\n\r\n"), parser_may_refuse=True)
    assert_serving(port)
