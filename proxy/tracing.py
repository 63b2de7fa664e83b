"""Traces: OpenTelemetry spans with the GenAI semantic conventions, exported over
OTLP/HTTP when `observability.otlp_endpoint` is set; and the W3C `traceparent` sent
to the backend either way.

One server span per request (named `{operation} {model}`, the conventions' form), a
child span for the wait in the admission queue, and one child span per attempt at a
backend (from sending to the answer's first byte). Attributes name the operation, the
models asked for and answered, the tokens used, the finish reasons, the key id (never
the key), the session, the upstream and its replica; never message text. Spans are
exported in batches by the SDK's own thread, with a bounded queue: a collector that is
down drops spans, it never slows or fails a request. With no endpoint, nothing of the
SDK is imported and a request costs one header.

The `traceparent` a backend gets: the attempt span's, when tracing; otherwise the
client's own when it is well formed, or a new one, so a backend that traces (vLLM
does) can join or start the trace.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from proxy.config import ObservabilityConfig

log = logging.getLogger("chat_proxy.tracing")

_TRACEPARENT = re.compile(r"^00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")


def new_traceparent() -> str:
    digits = os.urandom(24).hex()
    return f"00-{digits[:32]}-{digits[32:]}-01"


def incoming(headers: Any) -> str | None:
    """The client's traceparent when it is well formed (version 00), else None."""
    value = headers.get("traceparent")
    if value is None:
        return None
    if _TRACEPARENT.match(value):
        return str(value)
    value = value.strip().lower()
    return value if _TRACEPARENT.match(value) else None


class Tracing:
    """The SDK's tracer provider with a batch exporter to the collector."""

    def __init__(self, cfg: ObservabilityConfig) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        assert cfg.otlp_endpoint is not None
        self.provider = TracerProvider(resource=Resource.create({"service.name": cfg.service_name}))
        exporter = OTLPSpanExporter(endpoint=f"{cfg.otlp_endpoint}/v1/traces", timeout=5)
        self.provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                max_queue_size=4096,
                schedule_delay_millis=1000,
                max_export_batch_size=512,
                export_timeout_millis=5000,
            )
        )
        self.tracer = self.provider.get_tracer("chat-proxy")
        self._propagator = TraceContextTextMapPropagator()
        self._server = SpanKind.SERVER
        self._client = SpanKind.CLIENT
        self._internal = SpanKind.INTERNAL
        self._status = Status
        self._error = StatusCode.ERROR

    def server_span(self, headers: Any) -> Any:
        """The request's span, a child of the client's traceparent when it sent one."""
        parent = self._propagator.extract(carrier={"traceparent": incoming(headers) or ""})
        return self.tracer.start_span("request", context=parent, kind=self._server)

    def child(self, parent: Any, name: str, client: bool, attributes: dict[str, Any]) -> Any:
        from opentelemetry.trace import set_span_in_context

        return self.tracer.start_span(
            name,
            context=set_span_in_context(parent),
            kind=self._client if client else self._internal,
            attributes=attributes,
        )

    def traceparent(self, span: Any) -> str:
        ctx = span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def fail(self, span: Any, description: str) -> None:
        span.set_status(self._status(self._error, description))

    def shutdown(self) -> None:
        self.provider.shutdown()


TRACING: Tracing | None = None


def configure(cfg: ObservabilityConfig) -> None:
    """Start tracing for this process when an endpoint is configured (once: a reload
    keeps the tracing the process started with)."""
    global TRACING
    if TRACING is not None or cfg.otlp_endpoint is None:
        return
    TRACING = Tracing(cfg)
    log.info("tracing to an OTLP collector", extra={"service": cfg.service_name})


def shutdown() -> None:
    """Flush the spans still queued (bounded by the exporter's timeout) and stop."""
    global TRACING
    if TRACING is not None:
        TRACING.shutdown()
        TRACING = None


_OPERATIONS = {
    "/chat/completions": "chat",
    "/completions": "text_completion",
    "/embeddings": "embeddings",
    "/responses": "chat",
}


def finish(ex: Any) -> None:
    """End the request's span with what the exchange knows by now."""
    tracing = TRACING
    span = ex.span
    if tracing is None or span is None:
        return
    operation = _OPERATIONS.get(ex.upstream_path, ex.route.name)
    model = ex.model or ex.requested_model
    span.update_name(f"{operation} {model}" if model else operation)
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "http.request.method": ex.request.method,
        "http.response.status_code": ex.status,
        "chat_proxy.request_id": ex.request_id,
        "chat_proxy.attempts": ex.attempts,
    }
    if model:
        attrs["gen_ai.request.model"] = model
    body = ex.body
    if body is not None:
        for name, attr in (
            ("max_tokens", "gen_ai.request.max_tokens"),
            ("max_completion_tokens", "gen_ai.request.max_tokens"),
            ("temperature", "gen_ai.request.temperature"),
            ("top_p", "gen_ai.request.top_p"),
        ):
            value = body.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                attrs[attr] = value
        if body.get("stream") is True:
            attrs["gen_ai.request.stream"] = True
    if ex.identity is not None:
        attrs["chat_proxy.key_id"] = ex.identity.id
    if ex.session_id:
        attrs["gen_ai.conversation.id"] = ex.session_id
    if ex.upstream is not None:
        attrs["chat_proxy.upstream"] = ex.upstream
    if ex.replica is not None:
        attrs["chat_proxy.replica"] = ex.replica
    if ex.queue_ms is not None:
        attrs["chat_proxy.queue_ms"] = round(ex.queue_ms, 3)
    if ex.first_token is not None:
        attrs["chat_proxy.time_to_first_token_ms"] = round(ex.first_token * 1000, 3)
    completion = ex.completion
    if isinstance(completion, dict):
        answered = completion.get("model")
        if isinstance(answered, str):
            attrs["gen_ai.response.model"] = answered
        rid = completion.get("id")
        if isinstance(rid, str):
            attrs["gen_ai.response.id"] = rid
        usage = completion.get("usage")
        if isinstance(usage, dict):
            for name, attr in (
                ("prompt_tokens", "gen_ai.usage.input_tokens"),
                ("completion_tokens", "gen_ai.usage.output_tokens"),
            ):
                value = usage.get(name)
                if isinstance(value, int):
                    attrs[attr] = value
        choices = completion.get("choices")
        if isinstance(choices, list):
            reasons = [
                c["finish_reason"]
                for c in choices
                if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)
            ]
            if reasons:
                attrs["gen_ai.response.finish_reasons"] = reasons
    if ex.error:
        attrs["error.type"] = ex.error
        if ex.status >= 500 or ex.status == 499:
            tracing.fail(span, ex.error)
    span.set_attributes(attrs)
    span.end()


def server_timing(ex: Any, upstream_ms: float | None = None) -> str:
    """`Server-Timing`: the proxy's own time so far (less the wait for admission and
    the backend's time to its first byte), the backend's, the queue's."""
    total = ex.elapsed_ms()
    queue = ex.queue_ms
    own = total - (queue or 0.0) - (upstream_ms or 0.0)
    text = f"proxy;dur={own if own > 0 else 0.0:.2f}"
    if upstream_ms is not None:
        text += f", upstream;dur={upstream_ms:.2f}"
    if queue is not None:
        text += f", queue;dur={queue:.2f}"
    return text
