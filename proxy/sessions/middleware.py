"""Automatic sessions: which conversation a chat request belongs to, and its record.

Detection, first rule that applies:

1. `elevenlabs_extra_body.conversation_id`: that session (created if new), source
   `elevenlabs`.
2. The `X-Session-Id` request header: that session, source `header`.
3. A single message apart from system and developer messages: a new session.
4. Several messages: the conversation is matched against what this key has seen.

The matching rule (4). A message is normalised to `[role, text, tool calls]`: text is
the content (a string, or the text of its parts in order, other parts as canonical
JSON) with runs of whitespace collapsed and ends trimmed; tool calls are
`[name, arguments]` with the arguments as canonical JSON (sorted keys) when they
parse; ids, names, `tool_call_id` and every other field are ignored, and system and
developer messages are left out wherever they are. After each turn the proxy stores
digests (SHA-256 of the owner and the normalised messages) of the last 2, 3 and 4
messages of the conversation ending with the assistant's reply (one set per choice
when `n > 1`), pointing to the session. A request is looked up by the digest of its
last min(4, available) messages ending at its LAST assistant message: one key, one
store round trip. So a client that appends the reply (streamed or not, tool calls
included) and new messages continues; one that trims old messages continues as long
as it keeps the last user message and the reply before its new message; a history
whose only earlier message is one assistant message (a greeting) is not matched,
since every conversation opening with that greeting would share it. A digest points to
the session that recorded it last, so identical conversations of one key continue the
newest session, and a client that edits and resends an earlier message continues the
session it branched from.

A turn records the request's new messages: those after its last assistant message,
or, for the first turn of a session, all of them (system prompt and greeting included).
A turn whose stream the backend cut short (`Exchange.incomplete`) carries
`"incomplete": true`; a complete turn has no such field.

The backend is sent (in `forward_header`) not the session id but
`sess_` + the first 32 hex digits of SHA-256(owner + NUL + session id): the same for
every turn of a session, on every replica and after restarts (so a backend's prefix
cache still groups a conversation), and different for two keys that name the same
conversation id, whose sessions are two sessions. The client sees its own id.

Session writes leave the request's path: a completion callback queues the turn for a
background writer, which commits within milliseconds. Lookups see queued turns, so a
client that sends its next message at once still continues.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from aiohttp import web
from pydantic import Field, field_validator

from proxy.chain import BuildContext, Feature, register
from proxy.config import Model
from proxy.errors import bad_request
from proxy.exchange import Exchange, Handler
from proxy.jsonfast import copy_tree
from proxy.routes import CHAT, Route
from proxy.store import MemoryStore, SessionStore, TurnRecord
from proxy.store.base import json_text

log = logging.getLogger("chat_proxy.session")

SESSION_HEADER = "X-Session-Id"
SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
TAIL = 4  # messages per digest at most (the history ends with an assistant message)
LOOKUP_TIMEOUT = 2.0  # seconds; a slower store starts a new session instead
PURGE_EVERY = 3600.0  # seconds between retention purges at most
MAX_PENDING = 10_000  # queued writes; beyond this turns are dropped (and logged)
BATCH = 200  # turns written in one transaction at most
GATHER = 0.005  # seconds a write waits for more turns to share its transaction

_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_HIDDEN_ROLES = ("system", "developer")

clock: Callable[[], float] = time.time  # the time sessions are stamped with


class SessionOptions(Model):
    store_content: bool = True
    retention_days: float | None = Field(30, gt=0)
    forward_header: str | None = SESSION_HEADER

    @field_validator("forward_header")
    @classmethod
    def _header(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not _HEADER_NAME.match(value):
            raise ValueError("must be an HTTP header name")
        return value


# -- normalisation and digests --


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


_copy = copy_tree


# -- what is kept when store_content is false --


def _redact_calls(calls: Any) -> list[dict[str, Any]] | None:
    if not isinstance(calls, list):
        return None
    out = []
    for call in calls:
        if isinstance(call, dict):
            fn: dict[str, Any] = call["function"] if isinstance(call.get("function"), dict) else {}
            out.append(
                {
                    "id": call.get("id"),
                    "type": call.get("type"),
                    "function": {"name": fn.get("name")},
                }
            )
    return out


def redact_message(message: Any) -> dict[str, Any]:
    """A message without text: its role, and the ids and names of tool calls."""
    if not isinstance(message, dict):
        return {"role": None}
    out: dict[str, Any] = {"role": message.get("role")}
    if isinstance(message.get("tool_call_id"), str):
        out["tool_call_id"] = message["tool_call_id"]
    calls = _redact_calls(message.get("tool_calls"))
    if calls:
        out["tool_calls"] = calls
    return out


# -- the background writer --


class Writer:
    """Queues turns and writes them in batches off the request path.

    Turns join the open batch (a list); the queue carries batches, so the writer task
    is woken once per batch, not once per turn."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store
        # batches of (write number, turn): `queue.join()` returns when all are written
        self.queue: asyncio.Queue[list[tuple[int, TurnRecord]]] = asyncio.Queue()
        # digests of queued turns: (owner, digest) -> (session id, write number)
        self.pending: dict[tuple[str, str], tuple[str, int]] = {}
        self._seq = 0
        self.token = "w:" + os.urandom(6).hex()  # this writer, in the stores' guards
        self._batch: list[tuple[int, TurnRecord]] = []  # the batch new turns join
        self._waiting = 0  # turns submitted and not yet taken by the writer
        self._task: asyncio.Task[None] | None = None

    def submit(self, rec: TurnRecord) -> None:
        if self._waiting >= MAX_PENDING:
            log.error("session writes are falling behind; a turn of %s was dropped", rec.session_id)
            return
        self._seq += 1
        seq = self._seq
        rec.writer = self.token
        rec.seq = seq
        if rec.digests:
            entry = (rec.session_id, seq)
            owner = rec.owner
            pending = self.pending
            for d in rec.digests:
                pending[(owner, d)] = entry
        self._waiting += 1
        batch = self._batch
        batch.append((seq, rec))
        if len(batch) == 1:
            self.queue.put_nowait(batch)
        if len(batch) >= BATCH:
            self._batch = []

    def queued(self, owner: str, d: str) -> str | None:
        hit = self.pending.get((owner, d))
        return hit[0] if hit else None

    async def _write(self, records: list[TurnRecord]) -> None:
        if len(records) > 1:
            try:
                await self.store.record_turns(records)
                return
            except Exception:
                # one bad turn must not take the batch down: write them one by one
                log.warning(
                    "session batch write failed; writing its %d turns one by one", len(records)
                )
            for rec in records:
                await self._write([rec])
            return
        for attempt in range(3):
            try:
                await self.store.record_turns(records)
                return
            except Exception:
                if attempt == 2:
                    log.exception("session store write failed; %d turn(s) lost", len(records))
                    return
                await asyncio.sleep(0.1 * (attempt + 1))

    def _take(self, batch: list[tuple[int, TurnRecord]]) -> None:
        """Close the batch: the turns submitted from now on join the next one."""
        if batch is self._batch:
            self._batch = []
        self._waiting -= len(batch)

    async def run(self) -> None:
        while True:
            batch = await self.queue.get()
            taken = False
            try:
                if len(batch) < BATCH:
                    # under load the next turns are only milliseconds away: sharing
                    # one transaction (one commit) costs far less than one each
                    await asyncio.sleep(GATHER)
                self._take(batch)
                taken = True
                await self._write([rec for _, rec in batch])
            finally:
                if not taken:
                    self._take(batch)
                pending = self.pending
                for seq, rec in batch:
                    for d in rec.digests:
                        key = (rec.owner, d)
                        hit = pending.get(key)
                        if hit is not None and hit[1] == seq:
                            del pending[key]
                self.queue.task_done()

    async def flush(self, timeout: float = 2.0) -> None:
        """Wait until every queued turn is written (or the timeout passes)."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), timeout)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="session-writer")

    async def stop(self, timeout: float = 10.0) -> None:
        await self.flush(timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


# -- the middleware --


ID_PREFIX = "sess_"
ID_TIME_DIGITS = 12  # hex digits of the creation time: 48 bits of milliseconds
ID_RANDOM_BYTES = 16  # 128 random bits


def new_session_id() -> str:
    """A new session id: `sess_`, the creation time in milliseconds (12 hex digits of
    `clock`, so that ids sort by creation and a store's inserts stay near each other),
    then 128 random bits (32 hex digits). Nothing in it counts sessions or ties one to
    another session of the same process; one system call per id."""
    ms = int(clock() * 1000) & 0xFFFF_FFFF_FFFF
    return f"{ID_PREFIX}{ms:012x}{os.urandom(ID_RANDOM_BYTES).hex()}"


def forwarded_id(owner: str, session_id: str) -> str:
    """The id the backend is sent for the owner's session: a function of both, so
    that two owners' sessions of one id never reach it as one (whichever rule found
    the session, even an id the proxy generated: a client may send any id back)."""
    data = _owner_bytes(owner) + b"\0" + session_id.encode("utf-8", "surrogateescape")
    return ID_PREFIX + hashlib.sha256(data).hexdigest()[:32]


def _key_id(ex: Exchange) -> str | None:
    identity = ex.identity
    return identity.id if identity is not None else None


def _client_id(value: Any, param: str) -> str:
    if not isinstance(value, str) or not SAFE_ID.match(value):
        raise bad_request(
            f"`{param}` must be 1 to 128 letters, digits, '.', '_', ':' or '-'.",
            param=param,
            code="invalid_session_id",
        )
    return value


def _choice_index(choice: dict[str, Any]) -> int:
    index = choice.get("index", 0)
    return index if isinstance(index, int) else 0


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@register(
    "session",
    SessionOptions,
    after=(("auth", "sessions are kept per address, and a key never sees its own"),),
)
def session(options: SessionOptions, ctx: BuildContext) -> Feature:
    store: SessionStore = ctx.store if ctx.store is not None else MemoryStore()
    writer = Writer(store)
    retention = options.retention_days * 86400 if options.retention_days else None
    purger: list[asyncio.Task[None]] = []

    async def purge_loop(every: float) -> None:
        assert retention is not None
        while True:
            try:
                n = await store.purge(clock() - retention)
                if n:
                    log.info("purged %d session(s) older than %g days", n, options.retention_days)
            except Exception as exc:
                log.warning("session purge failed: %s", exc)
            await asyncio.sleep(every)

    async def start() -> None:
        writer.start()
        if retention is not None:
            every = min(PURGE_EVERY, max(1.0, retention / 10))
            purger.append(asyncio.create_task(purge_loop(every), name="session-purge"))

    async def stop() -> None:
        for task in purger:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        purger.clear()
        await writer.stop()

    from proxy.sessions_api import sessions_api

    api = Route(
        "sessions",
        {"GET": "sessions:read", "DELETE": "sessions:write", "*": "sessions:read"},
        paths=("/v1/sessions",),
        prefixes=("/v1/sessions/",),
        terminal=sessions_api(store, writer),
    )

    async def find(owner: str, convo: list[dict[str, Any]]) -> str | None:
        d = lookup_digest(owner, convo)
        if d is None:
            return None
        queued = writer.queued(owner, d)
        if queued is not None:
            return queued
        try:
            # a deadline on this task rather than wait_for's task of its own
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                return await store.find_session(owner, d)
        except Exception as exc:
            log.warning("session lookup failed, starting a new session: %s", exc)
            return None

    async def middleware(ex: Exchange, call_next: Handler) -> web.StreamResponse:
        body = ex.body
        if ex.route is not CHAT or body is None:
            return await call_next(ex)
        raw = body.get("messages")
        messages: list[Any] = raw if isinstance(raw, list) else []
        convo = conversation(messages)
        owner = ex.client_id

        conversation_id = ex.conversation_id
        header = ex.request.headers.get(SESSION_HEADER, "").strip()
        found: str | None = None
        if conversation_id is not None and conversation_id != "":
            sid = _client_id(conversation_id, "elevenlabs_extra_body.conversation_id")
            source = "elevenlabs"
        elif header:
            sid, source = _client_id(header, SESSION_HEADER), "header"
        elif len(convo) > 1 and (found := await find(owner, convo)) is not None:
            sid, source = found, "continued"
        else:
            sid, source = new_session_id(), "new"

        ex.session_id = sid
        ex.response_headers[SESSION_HEADER] = sid
        if options.forward_header:
            ex.upstream_headers[options.forward_header] = forwarded_id(owner, sid)
        ex.session_source = source

        # a new session's first turn holds the whole context it opened with
        fresh = list(messages) if source == "new" else new_messages(messages)
        opening = (
            list(messages)
            if source in ("elevenlabs", "header") and len(fresh) < len(messages)
            else None
        )

        def record(ex: Exchange) -> None:
            doc = ex.completion
            if not isinstance(doc, dict):
                return
            choices = [c for c in doc.get("choices") or () if isinstance(c, dict)]
            if not choices:
                return
            if len(choices) > 1:
                choices.sort(key=_choice_index)
            replies = [
                c["message"] if isinstance(c.get("message"), dict) else {"role": "assistant"}
                for c in choices
            ]
            reply = replies[0]
            usage = doc.get("usage") if isinstance(doc.get("usage"), dict) else None
            at = clock()
            model = doc.get("model") if isinstance(doc.get("model"), str) else ex.model
            # the request's own messages: the turn's JSON text below is their snapshot
            turn_messages: list[Any] = fresh
            first_messages: list[Any] | None = opening
            response: dict[str, Any] = {
                "role": "assistant",
                "content": reply.get("content"),
                "tool_calls": reply.get("tool_calls") or None,
            }
            if not options.store_content:
                turn_messages = [redact_message(m) for m in _copy(turn_messages)]
                if first_messages is not None:
                    first_messages = [redact_message(m) for m in _copy(first_messages)]
                response = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": _redact_calls(reply.get("tool_calls")) or None,
                }
            turn = {
                "created": int(at),
                "messages": turn_messages,
                "response": response,
                "finish_reason": choices[0].get("finish_reason"),
                "model": model,
                "usage": usage,
                "latency_ms": round(ex.elapsed_ms()),
            }
            if ex.incomplete:
                # the stream ended early: the reply is what the client got of it
                turn["incomplete"] = True
            text = json_text(turn)
            first_text = None
            if text is not None and first_messages is not None:
                first_text = json_text({**turn, "messages": first_messages})
            if text is None or (first_messages is not None and first_text is None):
                # values only the standard encoder writes faithfully: the store writes
                # them from a copy
                text = first_text = None
                if options.store_content:
                    turn["messages"] = _copy(turn_messages)
                    if first_messages is not None:
                        first_messages = _copy(first_messages)
            writer.submit(
                TurnRecord(
                    owner=owner,
                    session_id=sid,
                    at=at,
                    source=source,
                    key_id=_key_id(ex),
                    model=model,
                    turn=turn,
                    opening=first_messages,
                    prompt_tokens=_int(usage.get("prompt_tokens")) if usage else 0,
                    completion_tokens=_int(usage.get("completion_tokens")) if usage else 0,
                    total_tokens=_int(usage.get("total_tokens")) if usage else 0,
                    digests=record_digests(owner, convo, replies),
                    digest_ttl=retention,
                    text=text,
                    first_text=first_text,
                )
            )

        ex.on_complete.append(record)
        return await call_next(ex)

    return Feature(middleware, routes=(api,), startup=(start,), shutdown=(stop,))
