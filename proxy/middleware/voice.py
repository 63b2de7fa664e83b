"""voice: a filler for voice agents while the model's first word is late.

A streamed chat request (`stream: true`) that has sent the client no content
`filler_after_ms` after it came gets one content delta holding `filler`, then the
model's text as it comes. To a caller of a voice agent a late first word is dead air;
the filler is something to say meanwhile (the trailing space of the default keeps the
platform's speech from running it into the first word).

Decisions:
- The time counts from the request's arrival: the admission queue and the backend's
  time to its first byte count, as the caller hears them.
- A choice's wait ends at its first content, tool call or finish_reason; the
  filler goes once per response, never to a non-streamed request. With `n` > 1 one
  chunk carries it to every choice still silent (each choice is a reply of its own).
- The filler is written to the client beside the relay, after every event transform
  and outside the accumulated answer: the session's recorded turn
  (`Exchange.completion`) and tool_keywords never see it. Whether content has gone is
  judged on the events as they leave, after the other middlewares' transforms (this
  one's transform runs last whatever its place in the chain).
- Role: the filler carries `delta.role: "assistant"` on a choice whose role has not
  gone yet, and the backend's own role on that choice is then dropped (the OpenAI SDK
  joins repeated delta strings, "assistantassistant"). Its chunk has the stream's id,
  created and model when the backend's chunks have come; before them, an id of its
  own, the time now and the model the client named.
- When the backend has sent nothing yet, the proxy sends the response head (200,
  text/event-stream, with the response headers known by then: `x-upstream` and the
  like are chosen later and are not sent) before the filler. The relay then writes
  into that stream (`Exchange.stream_opener`). A failure after that can no longer be a
  status: it is one SSE error event in the OpenAI shape, then the end of the stream,
  as the relay ends a stream that fails midway. The upstream handler's retries and
  fallback still run before that: the filler is not the backend's, so another
  attempt's answer follows it whole.
- A backend that answers a streamed request with a JSON body after the filler has
  gone: an error event (`upstream_bad_response`), since the body cannot follow.
- The timer is the event loop's (`call_at`), cancelled when the answer starts; a
  request this middleware does not act on costs nothing more.

Stand it after auth, rate_limit and validate: a request one of them refuses after
the filler has gone gets its error as an event of a 200 stream, not as its status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import REGISTRY, Counter
from pydantic import Field

from proxy import sse
from proxy.chain import BuildContext, register
from proxy.config import Model
from proxy.errors import ProxyError, sse_error_event
from proxy.exchange import Exchange, Handler, Middleware
from proxy.relay import SSE_HEADERS
from proxy.routes import CHAT

log = logging.getLogger("chat_proxy.voice")

_METRIC = "chat_proxy_voice_fillers_total"


def _make_counter() -> Counter:
    try:
        return Counter(
            _METRIC,
            "Fillers sent to streams whose first content was late, by whether the "
            "backend had started its stream (in_stream) or not (before_stream).",
            ["stage"],
        )
    except ValueError:  # already registered: this module was loaded a second time
        existing = REGISTRY._names_to_collectors.get(_METRIC)
        if isinstance(existing, Counter):
            return existing
        raise


FILLERS: Counter = _make_counter()
_BEFORE = FILLERS.labels(stage="before_stream")
_IN_STREAM = FILLERS.labels(stage="in_stream")

_CHUNK_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")
_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError)


class VoiceOptions(Model):
    filler_after_ms: float = Field(1200, gt=0)
    filler: str = Field("... ", min_length=1)


def _choices(body: dict[str, Any] | None) -> int:
    n = body.get("n") if body is not None else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def _answered(choice: dict[str, Any]) -> bool:
    """Whether this choice of a chunk starts the answer: content, a tool call or its
    end."""
    if choice.get("finish_reason"):
        return True
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return False
    text = delta.get("content")
    return bool(
        (isinstance(text, str) and text) or delta.get("tool_calls") or delta.get("function_call")
    )


def _unrole(choice: Any, indexes: set[int]) -> Any:
    """The choice without `delta.role` if its index is one of `indexes`."""
    if not isinstance(choice, dict) or choice.get("index", 0) not in indexes:
        return choice
    delta = choice.get("delta")
    if not isinstance(delta, dict) or "role" not in delta:
        return choice
    return {**choice, "delta": {k: v for k, v in delta.items() if k != "role"}}


class Filler:
    """One streamed request's filler: its timer, the event transform that watches the
    stream leave (EventTransform) and the opener of the client's stream
    (StreamOpener)."""

    def __init__(self, ex: Exchange, text: str, after: float) -> None:
        self.ex = ex
        self.text = text
        self.after = after
        # the choices that have not started their answer
        self.waiting: set[int] = set(range(_choices(ex.body)))
        # the choices whose role has gone to the client
        self.roles: set[int] = set()
        # the choices whose role the filler carried: the backend's is dropped
        self.strip: set[int] = set()
        # id, created, model... of the stream's chunks, once one has come
        self.head: dict[str, Any] | None = None
        self.out: web.StreamResponse | None = None
        self.opening = False  # the client's stream is opened, or being opened
        self.over = False  # no filler any more: the stream or the request ended
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()

    # -- the timer --

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        left = self.after - (time.perf_counter() - self.ex.started)
        self.timer = loop.call_at(loop.time() + max(left, 0.0), self._due)

    def _due(self) -> None:
        self.timer = None
        if not self.over and self.waiting:
            self.task = asyncio.get_running_loop().create_task(self._fill())

    def _stop(self) -> None:
        self.over = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _chunk(self) -> bytes:
        head = self.head
        if head is None:
            ex = self.ex
            head = {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "created": int(time.time()),
                "model": ex.requested_model or ex.model or "",
            }
        choices = []
        for index in sorted(self.waiting):
            delta: dict[str, Any] = {"content": self.text}
            if index not in self.roles:
                delta = {"role": "assistant", **delta}
                self.strip.add(index)
                self.roles.add(index)
            choices.append({"index": index, "delta": delta, "finish_reason": None})
        self.waiting.clear()
        doc = {**head, "object": "chat.completion.chunk", "choices": choices}
        return sse.encode(sse.data_event(doc))

    def _may_fill(self) -> bool:
        # the relay names its error before it writes it
        return not self.over and bool(self.waiting) and self.ex.error is None

    async def _fill(self) -> None:
        ex = self.ex
        try:
            async with self.lock:
                if not self._may_fill():
                    return
                out = self.out
                stage = _IN_STREAM
                if out is None:
                    # the backend has sent nothing: the proxy opens the stream
                    stage = _BEFORE
                    self.opening = True
                    headers = dict(ex.response_headers)
                    headers.update(SSE_HEADERS)
                    out = web.StreamResponse(status=200, headers=headers)
                    await out.prepare(ex.request)
                    self.out = out
                if not self._may_fill():
                    return
                # no await from the check to the write: it lands between the
                # relay's writes, each of whole events
                await out.write(self._chunk())
                stage.inc()
                ex.log["filler_ms"] = round(ex.elapsed_ms(), 1)
        except _GONE:
            self.over = True
        except Exception:
            self.over = True
            log.exception("sending the filler failed", extra={"request_id": ex.request_id})

    async def settle(self) -> web.StreamResponse | None:
        """No filler from now on; the client's stream if it was opened."""
        self._stop()
        task = self.task
        if task is not None and not task.done():
            await task  # a filler under way: its stream may be opening
        return self.out

    def abandon(self) -> None:
        self._stop()
        if self.task is not None:
            self.task.cancel()

    async def fail(self, out: web.StreamResponse, err: ProxyError) -> None:
        """End the client's stream with `err` as its last event."""
        ex = self.ex
        ex.stream = True
        ex.status = out.status
        ex.error = ex.error or err.code or err.type
        with contextlib.suppress(*_GONE, RuntimeError):  # gone, or ended already
            await out.write(sse_error_event(err))
            await out.write_eof()

    # -- StreamOpener --

    async def open(self, status: int, headers: dict[str, str]) -> web.StreamResponse:
        async with self.lock:
            if self.out is None:
                self.opening = True
                out = web.StreamResponse(status=status, headers=headers)
                await out.prepare(self.ex.request)
                self.out = out
            return self.out

    def claim_body(self) -> bool:
        if self.opening:
            return False
        self._stop()
        return True

    # -- EventTransform --

    def on_event(self, event: sse.Event) -> list[sse.Event]:
        if not self.waiting and not self.strip:
            return [event]
        data = event.data
        if data is None:
            return [event]
        if data == "[DONE]":
            self._stop()
            return [event]
        if not self.waiting and '"role"' not in data:
            return [event]
        doc = event.json()
        if not isinstance(doc, dict):
            return [event]
        if "error" in doc:
            self._stop()
            return [event]
        choices = doc.get("choices")
        if not isinstance(choices, list):
            return [event]
        if self.head is None and isinstance(doc.get("id"), str):
            self.head = {k: doc[k] for k in _CHUNK_FIELDS if k in doc}
        unrole: set[int] = set()
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            if not isinstance(index, int):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict) and "role" in delta:
                if index in self.strip:
                    unrole.add(index)  # its role went with the filler
                else:
                    self.roles.add(index)
            if index in self.waiting and _answered(choice):
                self.waiting.discard(index)
                if not self.waiting and self.timer is not None:
                    self.timer.cancel()
                    self.timer = None
        if not unrole:
            return [event]
        return [sse.changed(event, {**doc, "choices": [_unrole(c, unrole) for c in choices]})]

    def on_end(self) -> list[sse.Event]:
        self._stop()
        return []


_WHY = "a request it refuses after the filler went gets its error in a 200 stream"


@register("voice", VoiceOptions, after=(("auth", _WHY), ("rate_limit", _WHY), ("validate", _WHY)))
def voice(options: VoiceOptions, ctx: BuildContext) -> Middleware:
    after = options.filler_after_ms / 1000
    text = options.filler

    async def mw(ex: Exchange, call_next: Handler) -> web.StreamResponse:
        if ex.route is not CHAT or not ex.wants_stream or ex.output is not None:
            # (a Responses API stream: its events are not chat chunks)
            return await call_next(ex)
        filler = Filler(ex, text, after)
        # first in the list, so last to run: it sees the events as they leave
        ex.event_transforms.insert(0, filler)
        ex.stream_opener = filler
        filler.start()
        try:
            response = await call_next(ex)
        except Exception as exc:
            out = await filler.settle()
            if out is None:
                raise
            if isinstance(exc, ProxyError):
                err = exc
            else:
                log.exception(
                    "request failed after the filler", extra={"request_id": ex.request_id}
                )
                err = ProxyError(
                    500, "The proxy failed to handle this request.", code="internal_error"
                )
            await filler.fail(out, err)
            return out
        except BaseException:
            filler.abandon()
            raise
        out = await filler.settle()
        if out is not None and response is not out:
            # an answer of an inner middleware's own, after the filler opened the stream
            log.warning(
                "an answer could not follow the filler", extra={"request_id": ex.request_id}
            )
            await filler.fail(
                out,
                ProxyError(
                    500,
                    "The proxy could not send this answer after the filler.",
                    code="internal_error",
                ),
            )
            return out
        return response

    return mw
