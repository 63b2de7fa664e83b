"""The affinity key of a request: what decides which replica it goes to under
`balance: affinity`.

1. A conversation the client names (ElevenLabs' `conversation_id`, the session
   header), or the session the session middleware found for it (however it was
   detected: a client that trims old messages keeps its session, and its replica):
   that id, per key. A name the client gives maps alike on every proxy; a session
   the proxy detected does where the proxies share their store.
2. Otherwise the request's leading messages: every message up to and including the
   first user message (the system prompt and the first turn). Each turn of a
   conversation resends them unchanged, so its turns meet on one replica, the one
   holding its prefix in the KV cache; requests that share a system prompt and a
   first message share that prefix too. For a completions request: the prompt's
   first 2,048 characters.
3. Nothing to go by (no body): no key; the least busy replica.
"""

from __future__ import annotations

from typing import Any

from proxy import jsonfast
from proxy.exchange import Exchange
from proxy.fleet.ring import key_hash

PROMPT_CHARS = 2048


def affinity_point(ex: Exchange) -> int | None:
    named = ex.conversation_id or ex.session_id
    if named:
        return key_hash(f"{ex.client_id}\0{named}".encode("utf-8", "surrogateescape"))
    body = ex.body
    if body is None:
        return None
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        return key_hash(jsonfast.dumps(_leading(messages)))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0]  # a batch: its first prompt
    if isinstance(prompt, str):
        return key_hash(prompt[:PROMPT_CHARS].encode("utf-8", "surrogateescape"))
    if prompt is not None:  # token ids
        return key_hash(jsonfast.dumps(prompt)[: PROMPT_CHARS * 4])
    return None


def _leading(messages: list[Any]) -> list[Any]:
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return messages[: i + 1]
    return messages[:1]
