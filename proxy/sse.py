"""Server-Sent Events as pure functions: an incremental parser and an encoder.

`parse(pending, chunk)` takes the parser's leftover and the bytes just read and
returns the complete events and the new leftover. Nothing is hidden in an object:
any split of a byte stream parses to the same events as the whole stream. The parser
follows the WHATWG rules: LF, CRLF or CR line ends, comments, multi-line `data:`,
`event:`, `id:` and `retry:` fields. It works on bytes and decodes whole lines only,
so a UTF-8 character split across reads is never broken.

Each event keeps the exact bytes it was parsed from (`raw`), so an event that no
transform changes is written back byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from proxy import jsonfast

_UNSET: Any = object()


@dataclass(slots=True)
class Event:
    """One block of lines up to a blank line. `data` is None when the block had no
    data field (for example a comment-only keepalive)."""

    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)
    raw: bytes | None = None
    # fields the SSE standard does not name (llama.cpp sends `error: {...}`)
    other: dict[str, str] | None = None
    _json: Any = field(default=_UNSET, repr=False, compare=False)

    def json(self) -> Any:
        """The data as JSON (parsed once), or None when it is absent or not JSON."""
        if self._json is _UNSET:
            value: Any = None
            if self.data is not None and self.data != "[DONE]":
                try:
                    value = jsonfast.loads(self.data)
                except (ValueError, RecursionError):
                    value = None
            self._json = value
        return self._json


class Pending(NamedTuple):
    """The parser's leftover: bytes of the unfinished event, and whether the last
    byte consumed was a CR whose LF (if it comes) belongs to it."""

    buf: bytes = b""
    after_cr: bool = False


START = Pending()


def _lines(buf: bytes, skip_lf: bool) -> list[tuple[int, int, int]]:
    """The complete lines of buf as (start, end of content, end with terminator).

    A CR at the very end counts as a line end; if an LF follows in the next read,
    the caller's `after_cr` flag (or the re-parse of the leftover) joins them."""
    lines: list[tuple[int, int, int]] = []
    n = len(buf)
    i = 1 if skip_lf and n and buf[0] == 0x0A else 0
    start = i
    find = buf.find
    while i < n:
        lf = find(b"\n", i)
        cr = find(b"\r", i, lf if lf != -1 else n)
        if cr == -1:
            if lf == -1:
                break
            lines.append((start, lf, lf + 1))
            i = start = lf + 1
            continue
        end = cr + 2 if cr + 1 < n and buf[cr + 1] == 0x0A else cr + 1
        lines.append((start, cr, end))
        i = start = end
    return lines


def parse(pending: Pending, chunk: bytes) -> tuple[list[Event], Pending]:
    """Parse `chunk` following `pending`; return complete events and the leftover."""
    if pending.buf and b"\n" not in chunk and b"\r" not in chunk:
        return [], Pending(pending.buf + chunk, False)
    buf = pending.buf + chunk if pending.buf else chunk
    if not buf:
        return [], pending
    events: list[Event] = []
    event_start = 0
    cur: Event | None = None
    data_lines: list[str] = []
    for start, end, term_end in _lines(buf, pending.after_cr and not pending.buf):
        if start == end:  # a blank line dispatches the event
            if cur is not None:
                if data_lines:
                    cur.data = "\n".join(data_lines)
                    data_lines = []
                cur.raw = buf[event_start:term_end]
                events.append(cur)
                cur = None
                event_start = term_end
            continue
        if cur is None:
            cur = Event()
        line = buf[start:end].decode("utf-8", "replace")
        if line[:1] == ":":
            cur.comments.append(line[1:].removeprefix(" "))
            continue
        name, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if name == "data":
            data_lines.append(value)
        elif name == "event":
            cur.event = value
        elif name == "id":
            if "\0" not in value:
                cur.id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                cur.retry = int(value)
        elif sep:
            if cur.other is None:
                cur.other = {}
            cur.other[name] = value
    rest = buf[event_start:]
    return events, Pending(rest, not rest and buf[-1:] == b"\r")


def flush(pending: Pending) -> list[Event]:
    """Events left at the end of a stream that was not closed by a blank line.

    Browsers drop such an unterminated event; a proxy should not lose a backend's
    last event for a missing newline, so it is completed here."""
    if not pending.buf.strip(b"\r\n"):
        return []
    events, _rest = parse(pending, b"\n\n")
    for ev in events:
        ev.raw = None  # its bytes were incomplete; re-encode it
    return events


def encode(event: Event) -> bytes:
    """Encode an event, reusing its original bytes when it has them."""
    if event.raw is not None:
        return event.raw
    parts: list[str] = []
    for comment in event.comments:
        parts.append(f": {comment}\n" if comment else ":\n")
    if event.event is not None:
        parts.append(f"event: {event.event}\n")
    if event.id is not None:
        parts.append(f"id: {event.id}\n")
    if event.retry is not None:
        parts.append(f"retry: {event.retry}\n")
    if event.other:
        for name, value in event.other.items():
            parts.append(f"{name}: {value}\n")
    if event.data is not None:
        for line in event.data.split("\n"):
            parts.append(f"data: {line}\n")
    parts.append("\n")
    # a lone surrogate (a backend's unpaired \ud800 escape, parsed) goes out as that
    # same escape: it can only sit inside a JSON string
    return "".join(parts).encode("utf-8", "backslashreplace")


def data_event(payload: Any) -> Event:
    """A new `data:` event holding JSON."""
    return Event(data=jsonfast.dumps_str(payload), _json=payload)


def changed(event: Event, payload: Any) -> Event:
    """The event with new JSON data; its raw bytes are dropped so it is re-encoded."""
    return Event(
        data=jsonfast.dumps_str(payload),
        event=event.event,
        id=event.id,
        retry=event.retry,
        comments=list(event.comments),
        other=dict(event.other) if event.other else None,
        _json=payload,
    )


def has_field(data: bytes) -> bool:
    """Whether SSE bytes hold a line other than a comment or a blank line."""
    if not data:
        return False
    if data[0:1] not in (b":", b"\r", b"\n"):
        return True
    for line in data.replace(b"\r", b"\n").split(b"\n"):
        if line and not line.startswith(b":"):
            return True
    return False
