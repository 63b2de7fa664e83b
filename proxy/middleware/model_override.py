"""model_override: choose the model the backend receives, whatever the client sends.

The model sent upstream is, in order: the key's own forced model (`model:` of its
auth entry), this middleware's `model`, the client's model, or `default` when the
client names none; the name chosen is then mapped through `aliases`. So a client may
send "junis-orchestrator", any other name or no model at all and get the configured
one, as the seed's orchestrator does.

Acts on chat requests and on passed-through JSON requests (embeddings, completions)
that carry a JSON object body. On GET /v1/models it lists one entry per alias. It
sets `ex.model_resolver` so that a key's model allowlist applies to the model that is
really used.

`report_model: requested` makes responses (streamed or not) report the client's name
for the model instead of the backend's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

from aiohttp import web
from pydantic import Field

from proxy import sse
from proxy.chain import BuildContext, register
from proxy.config import Model
from proxy.exchange import Exchange, Handler, Middleware
from proxy.routes import CHAT, MODELS, PASSTHROUGH


class ModelOverrideOptions(Model):
    model: str | None = Field(None, min_length=1)
    default: str | None = Field(None, min_length=1)
    aliases: dict[str, str] = Field(default_factory=dict)
    report_model: Literal["backend", "requested"] = "backend"
    owned_by: str = "chat-proxy"


class ReportModel:
    """An event transform writing `model` into every chunk that carries one."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_event(self, event: sse.Event) -> list[sse.Event]:
        payload = event.json()
        if isinstance(payload, dict) and "model" in payload and payload["model"] != self.name:
            return [sse.changed(event, {**payload, "model": self.name})]
        return [event]

    def on_end(self) -> list[sse.Event]:
        return []


@register(
    "model_override",
    ModelOverrideOptions,
    after=(("auth", "a key's own forced model is not known yet, so it is not applied"),),
)
def model_override(options: ModelOverrideOptions, ctx: BuildContext) -> Middleware:
    aliases = dict(options.aliases)

    def resolve(name: str) -> str:
        return aliases.get(name, name)

    def forced(ex: Exchange) -> str | None:
        """The name every request of this exchange is forced to, if any."""
        if ex.identity is not None and ex.identity.model:
            return ex.identity.model
        return options.model

    def resolver_for(ex: Exchange) -> Callable[[str], str]:
        force = forced(ex)
        if force is not None:
            target = resolve(force)
            return lambda name: target
        return resolve

    def add_aliases(doc: dict[str, Any]) -> dict[str, Any]:
        items = doc.get("data")
        if not isinstance(items, list):
            return doc
        known = {item.get("id"): item for item in items if isinstance(item, dict)}
        added = []
        for alias, target in aliases.items():
            if alias in known:
                continue
            owner = known.get(target, {}).get("owned_by") or options.owned_by
            added.append(
                {
                    "id": alias,
                    "object": "model",
                    "created": 0,
                    "owned_by": owner,
                    "root": target,
                    "parent": target,
                }
            )
        return {**doc, "data": [*items, *added]} if added else doc

    def mw(ex: Exchange, call_next: Handler) -> Awaitable[web.StreamResponse]:
        # a plain function handing on the next handler's awaitable: no coroutine of
        # its own alive for the whole of a stream
        ex.model_resolver = resolver_for(ex)
        if ex.route is MODELS:
            if aliases:
                ex.body_transforms.append(add_aliases)
            return call_next(ex)
        body = ex.body
        if (ex.route is not CHAT and ex.route is not PASSTHROUGH) or not isinstance(body, dict):
            return call_next(ex)
        sent = body.get("model")
        client_name = sent if isinstance(sent, str) and sent else None
        chosen = forced(ex) or client_name or options.default
        if chosen is None:
            return call_next(ex)
        target = resolve(chosen)
        if target != sent:
            body["model"] = target
        if options.report_model == "requested":
            shown = ex.requested_model or chosen
            ex.event_transforms.append(ReportModel(shown))
            ex.body_transforms.append(lambda doc: _with_model(doc, shown))
        return call_next(ex)

    return mw


def _with_model(doc: dict[str, Any], name: str) -> dict[str, Any]:
    if "model" in doc and doc["model"] != name:
        return {**doc, "model": name}
    return doc
