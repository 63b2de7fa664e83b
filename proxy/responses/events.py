"""A streamed chat completion as the Responses API's event sequence.

`StreamTranslator` is fed the backend's `chat.completion.chunk` payloads one by one
and returns, for each, the Responses events it makes: `(type, payload)` pairs whose
payload carries `type` and `sequence_number` (0, 1, 2, ... over the whole stream).

    response.created, response.in_progress
    per output item, in order:
      reasoning:     output_item.added, content_part.added,
                     reasoning_text.delta ..., reasoning_text.done,
                     content_part.done, output_item.done
      message:       output_item.added, content_part.added,
                     output_text.delta ..., output_text.done, content_part.done,
                     (a refusal part likewise, with refusal.delta / refusal.done),
                     output_item.done
      function call: output_item.added, function_call_arguments.delta ...,
                     function_call_arguments.done, output_item.done
    response.completed | response.incomplete | response.failed

Items are opened as the chunks' deltas come and closed when a delta of another
item begins: text after a tool call opens a second message item, and each chat tool
call (told apart by its `index`) is its own function_call item. A tool call whose
first delta has no name waits until the name comes. A delta for a tool call already
closed (no backend known to this proxy sends one) still goes out as an arguments
delta of that item, and the final response carries the whole arguments.

The final event comes exactly once: from `on_end()` (the backend's [DONE] or the end
of its stream) after a finish_reason, so that a usage-only last chunk
(`include_usage`) is folded into it; from `on_error()` (a backend error event) as
response.failed; or from `on_end()` as response.failed when the stream ended
without a finish_reason. Calls after it return no events.

Empty content deltas, role-only chunks and choices other than index 0 make no
events. `response` is the final Response object, the same as answer.to_response
gives for the same answer unstreamed (same item ids), for storing.

Why one module of over 400 lines: the Responses stream is one state machine (the
items open, their deltas, their ends, in order); split, its states would be read
across files.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

from proxy.responses import answer
from proxy.responses.translate import ChatCall

Event = tuple[str, dict[str, Any]]

ENDED_EARLY = "The backend's stream ended before the answer was finished."


class _Part:
    __slots__ = ("chunks", "index", "kind", "logprobs")

    def __init__(self, kind: str, index: int) -> None:
        self.kind = kind  # "text" or "refusal"
        self.index = index
        self.chunks: list[str] = []
        self.logprobs: list[dict[str, Any]] = []

    def build(self) -> dict[str, Any]:
        text = "".join(self.chunks)
        if self.kind == "refusal":
            return answer.refusal_part(text)
        return answer.text_part(text, self.logprobs)


class _Item:
    __slots__ = ("call_id", "chunks", "ident", "index", "kind", "name", "parts", "status")

    def __init__(self, kind: str, index: int, ident: str) -> None:
        self.kind = kind  # "reasoning", "message" or "function_call"
        self.index = index
        self.ident = ident
        self.status = "in_progress"
        self.chunks: list[str] = []  # reasoning text or arguments
        self.parts: list[_Part] = []  # a message's content
        self.call_id = ""
        self.name = ""

    def build(self, status: str | None = None) -> dict[str, Any]:
        status = status or self.status
        if self.kind == "message":
            return answer.message_item(self.ident, [p.build() for p in self.parts], status)
        if self.kind == "reasoning":
            return answer.reasoning_item(self.ident, "".join(self.chunks), status)
        return answer.function_call_item(
            self.ident, self.call_id, self.name, "".join(self.chunks), status
        )


class _Call:
    """A chat tool call by its index: pending until it has a name, then an item."""

    __slots__ = ("args", "id", "item", "name")

    def __init__(self) -> None:
        self.id: str | None = None
        self.name = ""
        self.args: list[str] = []
        self.item: _Item | None = None


class StreamTranslator:
    def __init__(
        self,
        call: ChatCall,
        response_id: str,
        created_at: float,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.call = call
        self.response_id = response_id
        self.created_at = created_at
        self._clock = clock
        self._seq = 0
        self._started = False
        self._ended = False
        self._model: str | None = None
        self._skeleton: dict[str, Any] | None = None
        self._items: list[_Item] = []
        self._current: _Item | None = None
        self._calls: dict[int, _Call] = {}
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self._final: dict[str, Any] | None = None

    # --- the API ------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Whether the final event has been made."""
        return self._ended

    @property
    def response(self) -> dict[str, Any]:
        """The final Response object; before the end, the response so far."""
        if self._final is not None:
            return self._final
        snapshot = copy.deepcopy(self._base())
        snapshot["output"] = [item.build() for item in self._items]
        return snapshot

    def messages_after(self) -> list[dict[str, Any]]:
        """answer.messages_after for this stream's answer."""
        return answer.messages_after(self.call, self.response)

    def start(self) -> list[Event]:
        """response.created and response.in_progress, once (on_chunk, on_error and
        on_end call it; call it first to send them before the backend answers)."""
        if self._started:
            return []
        self._started = True
        base = self._base()
        return [
            self._event("response.created", response=copy.deepcopy(base)),
            self._event("response.in_progress", response=copy.deepcopy(base)),
        ]

    def on_chunk(self, chunk: dict[str, Any]) -> list[Event]:
        """The events one chat.completion.chunk makes (an error payload in its place
        is handled as on_error)."""
        if self._ended:
            return []
        if not isinstance(chunk, dict):
            return []
        if "error" in chunk and "choices" not in chunk:
            return self.on_error(chunk)
        model = chunk.get("model")
        if isinstance(model, str) and model:
            self._model = model
        events = self.start()
        usage = answer.usage_of(chunk.get("usage"))
        if usage is not None:
            self._usage = usage
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._delta(delta, choice, events)
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                self._finish = reason
                self._close_all(events)
        return events

    def on_error(self, error: dict[str, Any]) -> list[Event]:
        """A backend error event: response.failed with its code and message."""
        if self._ended:
            return []
        events = self.start()
        self._fail(answer.response_error(error), events)
        return events

    def on_end(self) -> list[Event]:
        """The backend's stream is over ([DONE] or its end)."""
        if self._ended:
            return []
        events = self.start()
        if self._finish is None:
            self._fail({"code": "server_error", "message": ENDED_EARLY}, events)
            return events
        self._close_all(events)
        status, details = answer.outcome(self._finish)
        final = copy.deepcopy(self._base())
        final["output"] = [item.build() for item in self._items]
        answer.finish(final, status, details, self._usage, int(self._clock()))
        self._final = final
        self._ended = True
        kind = "response.completed" if status == "completed" else "response.incomplete"
        events.append(self._event(kind, response=copy.deepcopy(final)))
        return events

    # --- building -----------------------------------------------------------------

    def _base(self) -> dict[str, Any]:
        if self._skeleton is None:
            self._skeleton = answer.skeleton(
                self.call, self.response_id, self.created_at, self._model
            )
        if self._model:
            self._skeleton["model"] = self._model
        return self._skeleton

    def _event(self, kind: str, **fields: Any) -> Event:
        payload = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return kind, payload

    def _fail(self, error: dict[str, Any], events: list[Event]) -> None:
        final = copy.deepcopy(self._base())
        final["output"] = [
            item.build("incomplete" if item.status == "in_progress" else None)
            for item in self._items
        ]
        final["status"] = "failed"
        final["error"] = error
        final["usage"] = self._usage
        self._final = final
        self._ended = True
        events.append(self._event("response.failed", response=copy.deepcopy(final)))

    def _open(self, kind: str, prefix: str, events: list[Event]) -> _Item:
        self._close_current(events)
        index = len(self._items)
        item = _Item(kind, index, answer.item_id(prefix, self.response_id, index))
        self._items.append(item)
        self._current = item
        return item

    def _added(self, item: _Item, events: list[Event]) -> None:
        events.append(
            self._event("response.output_item.added", output_index=item.index, item=item.build())
        )

    def _delta(self, delta: dict[str, Any], choice: dict[str, Any], events: list[Event]) -> None:
        reasoning = answer.reasoning_of(delta)
        if reasoning:
            self._reasoning(reasoning, events)
        content = delta.get("content")
        if isinstance(content, str) and content:
            logprobs = answer.chat_logprobs(choice) if self.call.logprobs else []
            self._text("text", content, logprobs, events)
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            self._text("refusal", refusal, [], events)
        calls = delta.get("tool_calls")
        for position, call in enumerate(calls if isinstance(calls, list) else ()):
            if isinstance(call, dict):
                self._tool(call, position, events)
        legacy = delta.get("function_call")
        if isinstance(legacy, dict) and not calls:
            self._tool({"index": 0, "function": legacy}, 0, events)

    def _reasoning(self, text: str, events: list[Event]) -> None:
        item = self._current
        if item is None or item.kind != "reasoning":
            item = self._open("reasoning", "rs", events)
            self._added(item, events)
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item.ident,
                    output_index=item.index,
                    content_index=0,
                    part={"type": "reasoning_text", "text": ""},
                )
            )
        item.chunks.append(text)
        events.append(
            self._event(
                "response.reasoning_text.delta",
                item_id=item.ident,
                output_index=item.index,
                content_index=0,
                delta=text,
            )
        )

    def _message(self, events: list[Event]) -> _Item:
        item = self._current
        if item is None or item.kind != "message":
            item = self._open("message", "msg", events)
            self._added(item, events)
        return item

    def _text(
        self, kind: str, text: str, logprobs: list[dict[str, Any]], events: list[Event]
    ) -> None:
        item = self._message(events)
        part = item.parts[-1] if item.parts else None
        if part is None or part.kind != kind:
            if part is not None:
                self._close_part(item, part, events)
            part = _Part(kind, len(item.parts))
            item.parts.append(part)
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item.ident,
                    output_index=item.index,
                    content_index=part.index,
                    part=part.build(),
                )
            )
        part.chunks.append(text)
        if kind == "refusal":
            events.append(
                self._event(
                    "response.refusal.delta",
                    item_id=item.ident,
                    output_index=item.index,
                    content_index=part.index,
                    delta=text,
                )
            )
            return
        part.logprobs.extend(logprobs)
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=item.ident,
                output_index=item.index,
                content_index=part.index,
                delta=text,
                logprobs=answer.delta_logprobs(logprobs),
            )
        )

    def _tool(self, delta: dict[str, Any], position: int, events: list[Event]) -> None:
        index = delta.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            ident = delta.get("id")
            known = {c.id for c in self._calls.values()}
            if isinstance(ident, str) and ident and ident not in known:
                index = max(self._calls, default=-1) + 1
            else:
                open_calls = [i for i, c in self._calls.items() if c.item is self._current]
                index = open_calls[0] if open_calls else position
        rec = self._calls.get(index)
        if rec is None:
            rec = self._calls[index] = _Call()
        ident = delta.get("id")
        if rec.id is None and isinstance(ident, str) and ident:
            rec.id = ident
        fn = answer.object_of(delta.get("function"))
        name = fn.get("name")
        if rec.item is None and isinstance(name, str):
            rec.name += name
        args = answer.arguments_of(fn.get("arguments")) if fn.get("arguments") is not None else ""
        if rec.item is None:
            if args:
                rec.args.append(args)
            if rec.name:
                self._open_call(rec, events)
            return
        if args:
            item = rec.item
            item.chunks.append(args)
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item.ident,
                    output_index=item.index,
                    delta=args,
                )
            )

    def _open_call(self, rec: _Call, events: list[Event]) -> None:
        item = self._open("function_call", "fc", events)
        item.call_id = rec.id or answer.item_id("call", self.response_id, item.index)
        item.name = rec.name
        rec.item = item
        self._added(item, events)
        if rec.args:
            buffered = "".join(rec.args)
            rec.args = []
            item.chunks.append(buffered)
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item.ident,
                    output_index=item.index,
                    delta=buffered,
                )
            )

    def _close_part(self, item: _Item, part: _Part, events: list[Event]) -> None:
        text = "".join(part.chunks)
        where = {"item_id": item.ident, "output_index": item.index, "content_index": part.index}
        if part.kind == "refusal":
            events.append(self._event("response.refusal.done", **where, refusal=text))
        else:
            events.append(
                self._event(
                    "response.output_text.done",
                    **where,
                    text=text,
                    logprobs=answer.delta_logprobs(part.logprobs),
                )
            )
        events.append(self._event("response.content_part.done", **where, part=part.build()))

    def _close_current(self, events: list[Event], status: str = "completed") -> None:
        item = self._current
        if item is None:
            return
        self._current = None
        if item.kind == "message":
            if item.parts:
                self._close_part(item, item.parts[-1], events)
        elif item.kind == "reasoning":
            text = "".join(item.chunks)
            where = {"item_id": item.ident, "output_index": item.index, "content_index": 0}
            events.append(self._event("response.reasoning_text.done", **where, text=text))
            events.append(
                self._event(
                    "response.content_part.done",
                    **where,
                    part={"type": "reasoning_text", "text": text},
                )
            )
        else:
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item.ident,
                    output_index=item.index,
                    arguments="".join(item.chunks),
                )
            )
        item.status = status
        events.append(
            self._event("response.output_item.done", output_index=item.index, item=item.build())
        )

    def _close_all(self, events: list[Event]) -> None:
        """At the finish: tool calls still waiting for a name are opened, an answer
        without message or tool call gets an empty message (as to_response gives),
        and the last item closes, "incomplete" when the answer was cut short."""
        for index in sorted(self._calls):
            rec = self._calls[index]
            if rec.item is None:
                self._open_call(rec, events)
        if not any(item.kind in ("message", "function_call") for item in self._items):
            item = self._message(events)
            part = _Part("text", 0)
            item.parts.append(part)
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item.ident,
                    output_index=item.index,
                    content_index=0,
                    part=part.build(),
                )
            )
        status, _ = answer.outcome(self._finish)
        self._close_current(events, "incomplete" if status == "incomplete" else "completed")
