"""The Responses API on the proxy: POST /v1/responses through the chain, and the
stored responses (GET and DELETE /v1/responses/{id}).

A request to an upstream with `responses: translate` (the default) is turned into a
Chat Completions request at the way in (`apply`, after the key is known), so that the
chain applies as to chat: auth's scopes and models, rate limits with their token
reservation, validate, sessions, model_override and tool_keywords all see a chat
request. Its answer goes back to the client through `ResponsesOutput`, the last stage
on the way back, after the middlewares and the session have had the chat answer.
With `responses: native` the request goes to the backend's own /v1/responses as a
passthrough: the bytes as they came, both ways.

Stored responses (`store` not false) live in the proxy's store, per key (another
key's id is a 404, as is an unknown one), with the chat messages a later
`previous_response_id` continues from; a continued conversation is the same session.
A response is kept in this process from the moment its answer is complete until the
store has it, so a client that continues at once finds it.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy import jsonfast, sse
from proxy.dialects import elevenlabs
from proxy.errors import ProxyError
from proxy.exchange import Exchange, Route
from proxy.responses.answer import messages_after as answer_messages
from proxy.responses.answer import new_response_id, to_response
from proxy.responses.events import StreamTranslator
from proxy.responses.translate import ChatCall, to_chat, with_history
from proxy.routes import CHAT
from proxy.sessions.store.base import SessionStore, StoredResponse

if TYPE_CHECKING:
    from proxy.runtime import Runtime
    from proxy.upstream import Upstreams

log = logging.getLogger("chat_proxy.responses")

PATH = "/responses"  # after /v1
# a stored response larger than this (its messages and its Response) is not kept
MAX_STORED_BYTES = 8 * 1024 * 1024
# responses complete in this process whose store write has not finished yet
MAX_PENDING = 1024
_pending: OrderedDict[tuple[str, str], StoredResponse] = OrderedDict()

# chat parameters a middleware may name in an error, as the Responses API names them
_PARAMS = {
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "messages": "input",
}


def responses_param(param: str | None) -> str | None:
    """A chat parameter named in an error, as the Responses request names it."""
    if param is None:
        return None
    head = param.split("[", 1)[0].split(".", 1)[0]
    mapped = _PARAMS.get(head)
    if mapped is None:
        return param
    return mapped if head == "messages" else mapped + param[len(head) :]


class ResponsesOutput:
    """The answer as a Response object or as the Responses event sequence, and the
    record to store."""

    def __init__(self, call: ChatCall, owner: str, response_id: str, created: float) -> None:
        self.call = call
        self.owner = owner
        self.response_id = response_id
        self.created = created
        self.stream = StreamTranslator(call, response_id, created) if call.stream else None
        self.final: dict[str, Any] | None = None
        self.record: StoredResponse | None = None
        self.session_id: str | None = None

    # -- OutputStage --

    def body(self, completion: dict[str, Any]) -> dict[str, Any]:
        self.final = to_response(completion, self.call, self.response_id, self.created)
        self._keep(answer_messages(self.call, self.final))
        return self.final

    def events(self, events: list[sse.Event]) -> list[sse.Event]:
        translator = self.stream
        assert translator is not None
        out: list[sse.Event] = []
        for e in events:
            if e.data is None or e.data == "[DONE]":
                continue
            doc = e.json()
            if not isinstance(doc, dict):
                continue
            made = translator.on_error(doc) if _is_error(doc) else translator.on_chunk(doc)
            out.extend(_encode(made))
        return out

    def end(self) -> list[sse.Event]:
        translator = self.stream
        assert translator is not None
        out = _encode(translator.on_end())
        self._ended()
        return out

    def error(self, err: ProxyError) -> list[sse.Event]:
        translator = self.stream
        if translator is None:
            return []
        out = _encode(translator.on_error({"error": {"message": err.message, "code": err.code}}))
        self._ended()
        return out

    # -- storing --

    def _ended(self) -> None:
        translator = self.stream
        if translator is None or not translator.finished or self.final is not None:
            return
        self.final = translator.response
        self._keep(translator.messages_after())

    def _keep(self, messages: list[dict[str, Any]]) -> None:
        if not self.call.store or self.final is None:
            return
        response = jsonfast.dumps_str(self.final)
        history = jsonfast.dumps_str(messages)
        if len(response) + len(history) > MAX_STORED_BYTES:
            log.warning(
                "response not stored: larger than %d bytes",
                MAX_STORED_BYTES,
                extra={"response_id": self.response_id},
            )
            return
        self.record = StoredResponse(
            id=self.response_id,
            owner=self.owner,
            created=self.created,
            session_id=self.session_id,
            response=response,
            messages=history,
        )
        key = (self.owner, self.response_id)
        _pending[key] = self.record
        while len(_pending) > MAX_PENDING:
            _pending.popitem(last=False)


def _is_error(doc: dict[str, Any]) -> bool:
    return "error" in doc and "choices" not in doc


def _encode(made: list[tuple[str, dict[str, Any]]]) -> list[sse.Event]:
    return [sse.Event(event=kind, data=jsonfast.dumps_str(payload)) for kind, payload in made]


def mode_for(ex: Exchange, upstreams: Upstreams) -> str | None:
    """translate or native, by the first upstream serving the model; None when none
    serves it (the upstream handler says so)."""
    candidates = upstreams.candidates(ex.requested_model)
    return candidates[0].cfg.responses if candidates else None


async def apply(ex: Exchange, rt: Runtime) -> None:
    """POST /v1/responses: to chat for a translating upstream (the key is checked
    first: a stored conversation is looked up for it)."""
    if mode_for(ex, rt.upstreams) == "native":
        return
    for check in rt.before_body:
        check(ex)
    body = ex.body
    assert body is not None
    elevenlabs.apply(ex)  # its extra body, as for chat
    call = to_chat(body)
    owner = ex.client_id
    store = rt.ctx.store
    session_id: str | None = None
    if call.previous_response_id is not None:
        stored = await _find(store, owner, call.previous_response_id)
        if stored is None:
            raise ProxyError(
                404,
                f"Previous response with id '{call.previous_response_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        try:
            history = jsonfast.loads(stored.messages)
        except ValueError:
            history = None
        if not isinstance(history, list):
            raise ProxyError(
                500, "The stored conversation could not be read.", code="internal_error"
            )
        call = with_history(call, history)
        session_id = stored.session_id
    output = ResponsesOutput(call, owner, new_response_id(), int(time.time()))
    ex.body = call.body
    model = call.body.get("model")
    ex.requested_model = model if isinstance(model, str) else None
    ex.route = CHAT
    ex.upstream_path = "/chat/completions"
    ex.output = output
    ex.continues_session = session_id
    if call.store and store is not None:
        ex.on_complete.append(_saver(store, output))


def _saver(store: SessionStore, output: ResponsesOutput) -> Any:
    async def save(ex: Exchange) -> None:
        output.session_id = ex.session_id
        record = output.record
        if record is None:
            return
        if record.session_id != ex.session_id:
            record = StoredResponse(
                id=record.id,
                owner=record.owner,
                created=record.created,
                session_id=ex.session_id,
                response=record.response,
                messages=record.messages,
            )
            _pending[(record.owner, record.id)] = record
        try:
            await store.put_response(record)
        except Exception as exc:  # the client has its answer; the store is down
            log.warning("response not stored: %s", exc, extra={"response_id": record.id})
            return
        _pending.pop((record.owner, record.id), None)

    return save


async def _find(store: SessionStore | None, owner: str, response_id: str) -> StoredResponse | None:
    pending = _pending.get((owner, response_id))
    if pending is not None:
        return pending
    if store is None:
        return None
    try:
        return await store.get_response(owner, response_id)
    except Exception as exc:
        raise ProxyError(
            503, "The response store is unreachable; retry shortly.", code="store_unavailable"
        ) from exc


def stored_route(store: SessionStore | None, upstreams: Upstreams) -> Route:
    """GET and DELETE /v1/responses/{id}: this key's stored responses; on an upstream
    with `responses: native`, an id the proxy does not hold is the backend's."""

    async def terminal(ex: Exchange) -> web.StreamResponse:
        from proxy import upstream

        passthrough = ex.upstream_path[3:]  # the path after /v1, as a backend has it
        rest = passthrough[len(PATH) + 1 :]
        owner = ex.client_id
        native = any(u.cfg.responses == "native" for u in upstreams.all)
        if "/" in rest or not rest:
            if native:
                return await upstream.handle(ex, upstreams, passthrough)
            raise ProxyError(404, f"Unknown path {ex.upstream_path}.", code="not_found")
        if ex.request.method == "GET":
            stored = await _find(store, owner, rest)
            if stored is not None:
                ex.status = 200
                return web.Response(
                    body=stored.response.encode(),
                    content_type="application/json",
                    headers=ex.response_headers,
                )
        elif ex.request.method == "DELETE":
            pending = _pending.pop((owner, rest), None)
            deleted = False
            if store is not None:
                try:
                    deleted = await store.delete_response(owner, rest)
                except Exception as exc:
                    raise ProxyError(
                        503,
                        "The response store is unreachable; retry shortly.",
                        code="store_unavailable",
                    ) from exc
            if deleted or pending is not None:
                ex.status = 200
                return web.json_response(
                    {"id": rest, "object": "response", "deleted": True},
                    headers=ex.response_headers,
                )
        if native:
            return await upstream.handle(ex, upstreams, passthrough)
        raise ProxyError(404, f"Response with id '{rest}' not found.", code="not_found")

    return Route(
        "responses",
        {"GET": "chat", "DELETE": "chat"},
        prefixes=("/v1/responses/",),
        terminal=terminal,
    )
