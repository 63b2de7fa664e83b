"""Helpers for the Responses translation tests: chat completions and chunks as the
backends send them, and checks against the OpenAI SDK's own types."""

from __future__ import annotations

from typing import Any

from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from proxy.responses.events import Event, StreamTranslator
from proxy.responses.translate import ChatCall, to_chat

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)

RID = "resp_" + "ab" * 24
CREATED = 1_700_000_000


def call(**body: Any) -> ChatCall:
    return to_chat({"model": "m", "input": "hi", **body})


def completion(
    content: Any = "Hello.",
    *,
    finish: str | None = "stop",
    tool_calls: list[dict[str, Any]] | None = None,
    usage: dict[str, Any] | None = None,
    model: str = "backend-model",
    **message: Any,
) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content, **message}
    if tool_calls is not None:
        msg["tool_calls"] = tool_calls
    doc: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
    }
    if usage is not None:
        doc["usage"] = usage
    return doc


def tool_call(ident: str | None, name: str, arguments: str) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
    if ident is not None:
        doc["id"] = ident
    return doc


def chunk(
    delta: dict[str, Any] | None = None,
    *,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    model: str = "backend-model",
    choices: bool = True,
    **choice: Any,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish, **choice}]
        if choices
        else [],
    }
    if usage is not None:
        doc["usage"] = usage
    return doc


def text_chunks(*pieces: str) -> list[dict[str, Any]]:
    return [chunk({"role": "assistant", "content": ""})] + [chunk({"content": p}) for p in pieces]


def call_delta(
    index: int, ident: str | None = None, name: str | None = None, arguments: str | None = None
) -> dict[str, Any]:
    fn: dict[str, Any] = {}
    if name is not None:
        fn["name"] = name
    if arguments is not None:
        fn["arguments"] = arguments
    doc: dict[str, Any] = {"index": index, "function": fn}
    if ident is not None:
        doc["id"] = ident
        doc["type"] = "function"
    return doc


USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 7,
    "total_tokens": 18,
    "prompt_tokens_details": {"cached_tokens": 4},
    "completion_tokens_details": {"reasoning_tokens": 2},
}


# Fields OpenAI's API returns that the SDK's models do not name: a Response's
# `store`, in itself and in the events that carry one (OpenAI's own objects
# have it; the SDK's types leave it out).
UNTYPED = {".store", ".response.store"}


def no_extra(model: Any, where: str = "") -> None:
    """Every field of the SDK model (and of the models in it) is one the SDK names."""
    if isinstance(model, BaseModel):
        extra = {
            k: v
            for k, v in (model.__pydantic_extra__ or {}).items()
            if f"{where}.{k}" not in UNTYPED
        }
        assert not extra, f"{where or type(model).__name__}: fields the SDK does not name {extra}"
        for name in type(model).model_fields:
            no_extra(getattr(model, name), f"{where}.{name}")
    elif isinstance(model, list):
        for i, value in enumerate(model):
            no_extra(value, f"{where}[{i}]")
    elif isinstance(model, dict):
        for key, value in model.items():
            no_extra(value, f"{where}.{key}")


def response(doc: dict[str, Any]) -> Response:
    """The Response object validated by the SDK, with no field it does not know."""
    parsed = Response.model_validate(doc)
    no_extra(parsed)
    return parsed


def run(
    translator: StreamTranslator, chunks: list[dict[str, Any]], *, end: bool = True
) -> list[Event]:
    events: list[Event] = []
    for c in chunks:
        events.extend(translator.on_chunk(c))
    if end:
        events.extend(translator.on_end())
    return events


def check_events(events: list[Event]) -> list[Any]:
    """Every event validated by the SDK's ResponseStreamEvent union, its type what the
    pair says, sequence numbers 0, 1, 2, ..., one final event and it last."""
    parsed = []
    for i, (kind, payload) in enumerate(events):
        assert payload["type"] == kind
        assert payload["sequence_number"] == i, (i, kind)
        event = EVENTS.validate_python(payload)
        assert event.type == kind
        no_extra(event)
        parsed.append(event)
    finals = [
        i
        for i, (kind, _) in enumerate(events)
        if kind in ("response.completed", "response.incomplete", "response.failed")
    ]
    assert finals == [len(events) - 1]
    assert [k for k, _ in events[:2]] == ["response.created", "response.in_progress"]
    return parsed


def kinds(events: list[Event]) -> list[str]:
    return [k for k, _ in events]
