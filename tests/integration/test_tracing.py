"""Traces and timings as a user sees them: the traceparent a backend gets, the
Server-Timing header, and the spans an OTLP/HTTP collector receives (a stand-in
collector on loopback decoding the real protobuf export)."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.fixtures import Backend, ProxyFactory, chat_body, completion, json_handler

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
SECRET_TEXT = "the caller's secret words"


class Collector:
    """Receives OTLP/HTTP trace exports and keeps their spans and raw bytes."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.spans: list[Any] = []
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.raw.append(body)
        export = ExportTraceServiceRequest.FromString(body)
        for resource in export.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        return web.Response(content_type="application/x-protobuf", body=b"")

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    c = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", c.handle)
    c.server = TestServer(app)
    await c.server.start_server()
    yield c
    await c.server.close()


def attrs(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        v = kv.value
        kind = v.WhichOneof("value")
        if kind == "array_value":
            out[kv.key] = [getattr(x, x.WhichOneof("value")) for x in v.array_value.values]
        else:
            out[kv.key] = getattr(v, kind)
    return out


def tracing_config(endpoint: str, backend: Backend, extra: str = "") -> str:
    return f"""
observability: {{otlp_endpoint: {endpoint}, service_name: proxy-under-test}}
upstreams:
  - name: main
    url: {backend.url}
middleware:
  - type: auth
    keys:
      - {{id: team-a, key: sk-team-a}}
{extra}"""


PLAIN = """
upstreams:
  - name: main
    url: {backend}
"""


async def test_a_backend_gets_the_clients_traceparent_or_a_new_one(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(PLAIN, backend)
    theirs = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    await client.post("/v1/chat/completions", json=chat_body(), headers={"traceparent": theirs})
    await client.post("/v1/chat/completions", json=chat_body())
    await client.post(
        "/v1/chat/completions", json=chat_body(), headers={"traceparent": "00-zz-bad-01"}
    )
    sent = [s.headers.getall("traceparent") for s in backend.seen]
    assert sent[0] == [theirs]
    for made in (sent[1], sent[2]):
        assert len(made) == 1 and TRACEPARENT.match(made[0])
    assert sent[1][0] != sent[2][0]


async def test_server_timing_on_answers_and_on_errors(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(PLAIN, backend)
    ok = await client.post("/v1/chat/completions", json=chat_body())
    timing = ok.headers["Server-Timing"]
    assert re.fullmatch(r"proxy;dur=[0-9.]+, upstream;dur=[0-9.]+", timing), timing
    bad = await client.post("/v1/chat/completions", data=b"{not json")
    assert bad.status == 400
    assert re.fullmatch(r"proxy;dur=[0-9.]+", bad.headers["Server-Timing"])
    models = await client.get("/v1/models")
    assert "proxy;dur=" in models.headers["Server-Timing"]
    assert "proxy;dur=" in (await client.get("/healthz")).headers["Server-Timing"]


async def test_a_request_becomes_a_server_span_with_an_attempt_child(
    make_proxy: ProxyFactory, backend: Backend, collector: Collector
) -> None:
    doc = completion("Hi there")
    doc["usage"] = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    doc["model"] = "test-model-2025"
    backend.chat(json_handler(doc))
    client = await make_proxy(tracing_config(collector.url, backend))
    theirs = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    resp = await client.post(
        "/v1/chat/completions",
        json=chat_body(SECRET_TEXT, temperature=0.5, max_tokens=20),
        headers={"Authorization": "Bearer sk-team-a", "traceparent": theirs},
    )
    assert resp.status == 200
    await client.close()  # the app's shutdown flushes the spans
    for _ in range(50):
        if len(collector.spans) >= 2:
            break
        await asyncio.sleep(0.05)
    by_name = {s.name: s for s in collector.spans}
    server = by_name["chat test-model"]
    attempt = by_name["attempt"]
    a = attrs(server)
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "test-model"
    assert a["gen_ai.response.model"] == "test-model-2025"
    assert a["gen_ai.usage.input_tokens"] == 11 and a["gen_ai.usage.output_tokens"] == 3
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.request.temperature"] == 0.5 and a["gen_ai.request.max_tokens"] == 20
    assert a["chat_proxy.key_id"] == "team-a" and a["chat_proxy.upstream"] == "main"
    assert a["http.response.status_code"] == 200
    # a child of the client's trace; the attempt a child of the request
    assert server.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert server.parent_span_id.hex() == "00f067aa0ba902b7"
    assert attempt.parent_span_id == server.span_id
    assert attrs(attempt)["http.response.status_code"] == 200
    # the backend joined the trace under the attempt's span
    sent = TRACEPARENT.match(backend.seen[0].headers["traceparent"])
    assert sent is not None
    assert sent.group(1) == server.trace_id.hex() and sent.group(2) == attempt.span_id.hex()
    # never message text, never the key
    export = b"".join(collector.raw)
    assert SECRET_TEXT.encode() not in export and b"sk-team-a" not in export


async def test_a_collector_that_is_down_never_slows_or_fails_a_request(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # closed once the block ends: nothing listens
    client = await make_proxy(tracing_config(f"http://127.0.0.1:{dead}", backend))
    started = time.monotonic()
    for _ in range(30):
        resp = await client.post(
            "/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer sk-team-a"}
        )
        assert resp.status == 200
    assert time.monotonic() - started < 3.0


def timings(header: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        out[name] = float(dur)
    return out


async def test_server_timing_adds_up_to_what_the_client_waited(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.2 if b"slow" in await request.read() else 0.0)
        return web.json_response(completion())

    backend.chat(slow)
    text = f"""
upstreams:
  - name: fleet
    replicas: ["{backend.url}", "{backend.url.replace("127.0.0.1", "localhost")}"]
    max_in_flight: 1
    balance: round_robin
"""
    client = await make_proxy(text)
    started = time.monotonic()
    one = await client.post("/v1/chat/completions", json=chat_body("slow"))
    waited = (time.monotonic() - started) * 1000
    t = timings(one.headers["Server-Timing"])
    assert t["upstream"] >= 195 and t["queue"] < 20
    assert t["proxy"] + t["upstream"] + t["queue"] <= waited + 5
    # two held at once fill both replicas: a third waits for admission
    held = [
        asyncio.ensure_future(client.post("/v1/chat/completions", json=chat_body("slow")))
        for _ in range(2)
    ]
    await asyncio.sleep(0.05)
    third = await client.post("/v1/chat/completions", json=chat_body("fast"))
    t = timings(third.headers["Server-Timing"])
    assert t["queue"] >= 100
    assert abs(t["queue"] - float(third.headers["x-queue-ms"])) <= 1
    for r in await asyncio.gather(*held):
        assert r.status == 200
