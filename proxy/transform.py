"""The transformed relay of a stream: parse the backend's events, pass them through
the middlewares' event transforms (the last registered first), re-encode only what
changed, and note how the stream ended."""

from __future__ import annotations

import re
import time
from typing import Any

from proxy import sse
from proxy.completion import Accumulator
from proxy.errors import normalise_error_payload
from proxy.exchange import EventTransform, Exchange

# the largest event a parsed stream holds while waiting for its end (a backend that
# never ends a line would otherwise grow the buffer without bound)
MAX_EVENT_BYTES = 16 * 1024 * 1024


# a chunk that carries the answer's text or a tool call's arguments (not only a role,
# nor an empty string): where the first token a caller hears is
CONTENT_TOKEN = re.compile(rb'"(?:content|arguments)":\s*"(?!")')
_CONTENT_TOKEN_TEXT = re.compile(r'"(?:content|arguments)":\s*"(?!")')


class EventTooLarge(Exception):
    """A backend event grew past MAX_EVENT_BYTES without ending."""


class ErrorNormaliser:
    """Rewrites backend error events of other shapes into `data: {"error": {...}}`."""

    def on_event(self, event: sse.Event) -> list[sse.Event]:
        other = event.other.get("error") if event.other else None
        if other is None and (event.data is None or "error" not in event.data):
            return [event]
        fixed = normalise_error_payload(event.json(), other)
        if fixed is None:
            return [event]
        return [sse.data_event(fixed)]

    def on_end(self) -> list[sse.Event]:
        return []


class StreamTransformer:
    """The transformed relay: parse, pass through each transform, re-encode."""

    def __init__(self, ex: Exchange) -> None:
        # responses pass the chain bottom to top: the last registered transform first
        self.transforms: list[EventTransform] = [ErrorNormaliser()]
        self.transforms.extend(reversed(ex.event_transforms))
        self.acc = Accumulator() if ex.on_complete else None
        self.output = ex.output
        self.ex = ex
        self.pending = sse.START
        # reads inside one unfinished line, joined once its end comes (not re-parsed
        # read after read)
        self._held: list[bytes] = []
        self._held_size = 0
        # how the stream ended: `[DONE]`, the choices that had a finish_reason, and
        # whether the backend sent an error event
        self.done = False
        self.finished: set[Any] = set()
        self.failed = False

    def _watch(self, events: list[sse.Event]) -> None:
        for e in events:
            data = e.data
            if data is None:
                if e.other and "error" in e.other:
                    self.failed = True
                continue
            if data == "[DONE]":
                self.done = True
            elif "finish_reason" in data or "error" in data:
                doc = e.json()
                if not isinstance(doc, dict):
                    continue
                if "error" in doc or doc.get("object") == "error":
                    self.failed = True
                choices = doc.get("choices")
                if isinstance(choices, list):
                    for c in choices:
                        if isinstance(c, dict) and c.get("finish_reason"):
                            index = c.get("index", 0)
                            self.finished.add(index if isinstance(index, int) else 0)

    def _through(self, events: list[sse.Event], start: int = 0) -> list[sse.Event]:
        for t in self.transforms[start:]:
            out: list[sse.Event] = []
            for e in events:
                out.extend(t.on_event(e))
            events = out
        return events

    def _emit(self, events: list[sse.Event], last: bool = False) -> bytes:
        ex = self.ex
        if ex.first_token is None:
            for e in events:
                if e.data is not None and _CONTENT_TOKEN_TEXT.search(e.data):
                    ex.first_token = time.perf_counter() - ex.started
                    break
        if self.acc is not None:
            for e in events:
                if e.data is not None:
                    self.acc.feed(e.json())
        output = self.output
        if output is not None:
            events = output.events(events)
            if last:
                events.extend(output.end())
        return b"".join(sse.encode(e) for e in events)

    def _usage(self, events: list[sse.Event]) -> None:
        # usage belongs to the backend's answer even where a middleware hides it from
        # the client (rate_limit asks for it on the client's behalf)
        if self.acc is None:
            return
        for e in events:
            if e.data is not None and '"usage"' in e.data:
                doc = e.json()
                usage = doc.get("usage") if isinstance(doc, dict) else None
                if isinstance(usage, dict):
                    self.acc.usage = usage

    def _with_held(self, chunk: bytes) -> bytes:
        """The held reads and `chunk`, as one; nothing is held after."""
        if not self._held:
            return chunk
        data = b"".join([*self._held, chunk])
        self._held.clear()
        self._held_size = 0
        return data

    def feed(self, chunk: bytes) -> bytes:
        if self.pending.buf and b"\n" not in chunk and b"\r" not in chunk:
            self._held.append(chunk)
            self._held_size += len(chunk)
            if len(self.pending.buf) + self._held_size > MAX_EVENT_BYTES:
                raise EventTooLarge()
            return b""
        events, self.pending = sse.parse(self.pending, self._with_held(chunk))
        if len(self.pending.buf) > MAX_EVENT_BYTES:
            raise EventTooLarge()
        if not events:
            return b""
        self._watch(events)
        self._usage(events)
        return self._emit(self._through(events))

    def end(self) -> bytes:
        if self._held:
            held = self._with_held(b"")
            self.pending = sse.Pending(self.pending.buf + held, self.pending.after_cr)
        events = sse.flush(self.pending)
        self.pending = sse.START
        self._watch(events)
        self._usage(events)
        for t in self.transforms:
            out: list[sse.Event] = []
            for e in events:
                out.extend(t.on_event(e))
            out.extend(t.on_end())
            events = out
        return self._emit(events, last=True)
