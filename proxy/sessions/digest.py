"""Which conversation a request continues: messages normalised, and their digests.

A message is normalised to `[role, text, tool calls]`: text is the content (a string,
or the text of its parts in order, other parts as canonical JSON) with runs of
whitespace collapsed and ends trimmed; tool calls are `[name, arguments]` with the
arguments as canonical JSON (sorted keys) when they parse; ids, names, `tool_call_id`
and every other field are ignored, and system and developer messages are left out
wherever they are. After each turn the proxy stores digests (SHA-256 of the owner and
the normalised messages) of the last 2, 3 and 4 messages of the conversation ending
with the assistant's reply (one set per choice when `n > 1`), pointing to the session.
A request is looked up by the digest of its last min(4, available) messages ending at
its LAST assistant message: one key, one store round trip. So a client that appends
the reply (streamed or not, tool calls included) and new messages continues; one that
trims old messages continues as long as it keeps the last user message and the reply
before its new message; a history whose only earlier message is one assistant message
(a greeting) is not matched, since every conversation opening with that greeting would
share it. A digest points to the session that recorded it last, so identical
conversations of one key continue the newest session, and a client that edits and
resends an earlier message continues the session it branched from.

Digests are stored: a lookup must compute, byte for byte, the digest that an earlier
version of the proxy recorded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import orjson

TAIL = 4  # messages per digest at most (the history ends with an assistant message)

_HIDDEN_ROLES = ("system", "developer")


_canonical_json = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _canonical(value: Any) -> str:
    return _canonical_json.encode(value)


def _collapse(text: str) -> str:
    # runs of whitespace to one space, ends trimmed: str.split() and the regex `\s+`
    # agree on every Unicode whitespace character
    return " ".join(text.split())


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return _collapse(content)
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                parts.append(_canonical(part))
        return _collapse(" ".join(parts))
    return _canonical(content)


def _arguments(value: Any) -> str:
    if isinstance(value, str):
        try:
            return _canonical(json.loads(value))
        except (ValueError, RecursionError):
            return _collapse(value)
    return _canonical(value)


def normalise(message: dict[str, Any]) -> list[Any]:
    """A message as it counts for matching: `[role, text, [[name, arguments], ...]]`."""
    calls: list[list[str]] = []
    raw_calls = message.get("tool_calls")
    for call in raw_calls if isinstance(raw_calls, list) else ():
        if isinstance(call, dict):
            fn: dict[str, Any] = call["function"] if isinstance(call.get("function"), dict) else {}
            calls.append([str(fn.get("name") or ""), _arguments(fn.get("arguments"))])
    legacy = message.get("function_call")
    if isinstance(legacy, dict):
        calls.append([str(legacy.get("name") or ""), _arguments(legacy.get("arguments"))])
    return [str(message.get("role") or ""), _text(message.get("content")), calls]


def conversation(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """The messages that count for matching: dicts, without system/developer ones."""
    return [m for m in messages if isinstance(m, dict) and m.get("role") not in _HIDDEN_ROLES]


def digest(owner: str, tail: Sequence[list[Any]]) -> str:
    text = _canonical(list(tail)).encode("utf-8", "surrogatepass")
    data = owner.encode("utf-8", "surrogateescape") + b"\0" + text
    return hashlib.sha256(data).hexdigest()[:32]


def _message_key(message: dict[str, Any]) -> bytes:
    """The canonical JSON of a normalised message, as `digest` writes it inside its
    list. A normalised message holds strings and lists only, which orjson writes byte
    for byte as the standard encoder does (compact, no ASCII escaping), except a lone
    surrogate, which it refuses."""
    content = message.get("content")
    if (
        type(content) is str
        and message.get("tool_calls") is None
        and message.get("function_call") is None
    ):
        # the usual message, text without tool calls: `normalise` without its walk
        role = message.get("role")
        normal = [role if type(role) is str else str(role or ""), " ".join(content.split()), []]
    else:
        normal = normalise(message)
    try:
        return orjson.dumps(normal)
    except TypeError:
        return _canonical(normal).encode("utf-8", "surrogatepass")


def _digest_keys(owner: bytes, keys: Sequence[bytes]) -> str:
    """`digest` of the messages whose `_message_key`s these are."""
    return hashlib.sha256(owner + b"\0[" + b",".join(keys) + b"]").hexdigest()[:32]


def _owner_bytes(owner: str) -> bytes:
    return owner.encode("utf-8", "surrogateescape")


def lookup_digest(owner: str, convo: Sequence[dict[str, Any]]) -> str | None:
    """The digest of a request's history: its last messages up to and including its
    last assistant message, or None if it has no history worth matching."""
    last = None
    for i in range(len(convo) - 1, -1, -1):
        if convo[i].get("role") == "assistant":
            last = i
            break
    if last is None or last < 1:
        return None
    tail = convo[max(0, last + 1 - TAIL) : last + 1]
    return _digest_keys(_owner_bytes(owner), [_message_key(m) for m in tail])


def record_digests(
    owner: str, convo: Sequence[dict[str, Any]], replies: Sequence[dict[str, Any]]
) -> tuple[str, ...]:
    """The digests under which a later request continues this conversation."""
    before = [_message_key(m) for m in convo[-(TAIL - 1) :]] if TAIL > 1 else []
    out: list[str] = []
    who = b""
    for reply in replies:
        full = [*before, _message_key(reply)]
        for length in range(2, min(TAIL, len(full)) + 1):
            who = who or _owner_bytes(owner)
            d = _digest_keys(who, full[-length:])
            if d not in out:
                out.append(d)
    return tuple(out)


def new_messages(messages: Sequence[Any]) -> list[Any]:
    """The messages of a request that are new in this turn: those after its last
    assistant message, or all of them if it has none."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if isinstance(m, dict) and m.get("role") == "assistant":
            return list(messages[i + 1 :])
    return list(messages)
