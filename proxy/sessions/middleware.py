"""The session middleware: which session a chat request belongs to, and its record.

Detection, first rule that applies:

1. `elevenlabs_extra_body.conversation_id`: that session (created if new), source
   `elevenlabs`.
2. The `X-Session-Id` request header: that session, source `header`.
3. A single message apart from system and developer messages: a new session.
4. Several messages: the conversation is matched against what this key has seen
   (the matching rule: proxy/sessions/digest.py).

A turn records the request's new messages: those after its last assistant message,
or, for the first turn of a session, all of them (system prompt and greeting included).
A turn whose stream the backend cut short (`Exchange.incomplete`) carries
`"incomplete": true`; a complete turn has no such field. The turn is written off the
request's path (proxy/sessions/writer.py); the backend is sent an id derived from the
session's (proxy/sessions/ids.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web

from proxy.chain import BuildContext, Feature, register
from proxy.exchange import Exchange, Handler
from proxy.jsonfast import copy_tree
from proxy.ratelimit import LOOKED_UP
from proxy.routes import CHAT
from proxy.sessions import ids
from proxy.sessions.api import sessions_route
from proxy.sessions.digest import conversation, lookup_digest, new_messages, record_digests
from proxy.sessions.ids import client_session_id, forwarded_id, new_session_id
from proxy.sessions.options import SESSION_HEADER, SessionOptions
from proxy.sessions.store import MemoryStore, SessionStore, TurnRecord
from proxy.sessions.store.base import json_text
from proxy.sessions.writer import Writer

log = logging.getLogger("chat_proxy.session")

LOOKUP_TIMEOUT = 2.0  # seconds; a slower store starts a new session instead
PURGE_EVERY = 3600.0  # seconds between retention purges at most

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


# -- the middleware --


def _key_id(ex: Exchange) -> str | None:
    identity = ex.identity
    return identity.id if identity is not None else None


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
                n = await store.purge(ids.clock() - retention)
                if n:
                    log.info("purged %d session(s) older than %g days", n, options.retention_days)
            except Exception as exc:
                log.warning("session purge failed: %s", exc)
            await asyncio.sleep(every)

    async def start() -> None:
        writer.start()
        if hasattr(store, "lookahead"):
            # the Redis store's: the rate limiter sends this lookup with its check
            setattr(store, "lookahead", lookahead)  # noqa: B010
        if retention is not None:
            every = min(PURGE_EVERY, max(1.0, retention / 10))
            purger.append(asyncio.create_task(purge_loop(every), name="session-purge"))

    async def stop() -> None:
        for task in purger:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        purger.clear()
        if getattr(store, "lookahead", None) is lookahead:
            setattr(store, "lookahead", None)  # noqa: B010
        await writer.stop()

    api = sessions_route(store, writer.flush)

    def lookahead(ex: Exchange) -> tuple[str, str] | None:
        """(owner, digest) of the store lookup `middleware` will make for `ex`, for the
        rate limiter to send with its check (one round trip to Redis for both); None
        when it will not look the store up. A turn still queued here is found here
        then, and one written since was acknowledged before the lookup was sent."""
        body = ex.body
        if ex.route is not CHAT or body is None:
            return None
        if ex.continues_session is not None or ex.conversation_id:
            return None
        if ex.request.headers.get(SESSION_HEADER, "").strip():
            return None
        raw = body.get("messages")
        convo = conversation(raw if isinstance(raw, list) else [])
        if len(convo) <= 1:
            return None
        owner = ex.client_id
        d = lookup_digest(owner, convo)
        if d is None or writer.queued(owner, d) is not None:
            return None
        return owner, d

    async def find(ex: Exchange, owner: str, convo: list[dict[str, Any]]) -> str | None:
        d = lookup_digest(owner, convo)
        if d is None:
            return None
        queued = writer.queued(owner, d)
        if queued is not None:
            return queued
        ahead = ex.request.get(LOOKED_UP)
        if ahead is not None and ahead[0] == owner and ahead[1] == d:
            found: str | None = ahead[2]
            return found
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
        if ex.continues_session is not None:
            # a stored response's session (the Responses API's previous_response_id)
            sid, source = ex.continues_session, "continued"
        elif conversation_id is not None and conversation_id != "":
            sid = client_session_id(conversation_id, "elevenlabs_extra_body.conversation_id")
            source = "elevenlabs"
        elif header:
            sid, source = client_session_id(header, SESSION_HEADER), "header"
        elif len(convo) > 1 and (found := await find(ex, owner, convo)) is not None:
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
            at = ids.clock()
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
                # where the time went: waiting for admission, the backend's first
                # byte, its first content token (what a caller hears), the whole turn
                "timing": {
                    "queue_ms": _ms(ex.queue_ms / 1000 if ex.queue_ms is not None else None),
                    "ttfb_ms": _ms(ex.ttfb),
                    "first_token_ms": _ms(ex.first_token),
                    "total_ms": _ms(ex.elapsed_ms() / 1000),
                },
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


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
