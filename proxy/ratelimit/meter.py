"""What a response really used, to settle the tokens reserved at admission.

For a stream the proxy asks the backend for the usage chunk
(`stream_options.include_usage`) and hides it from a client that did not ask; a
response without usage is reckoned from its text.
"""

from __future__ import annotations

import json
import math
from typing import Any

from proxy import sse
from proxy.exchange import Exchange
from proxy.ratelimit.estimate import Estimate, positive_int
from proxy.routes import CHAT


def usage_total(usage: Any) -> int | None:
    if not isinstance(usage, dict):
        return None
    total = positive_int(usage.get("total_tokens"))
    if total is not None:
        return total
    parts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
    counted = [p for p in parts if isinstance(p, int) and not isinstance(p, bool)]
    return sum(counted) if counted else None


def _content_chars(choices: Any, key: str) -> int:
    chars = 0
    if isinstance(choices, list):
        for choice in choices:
            part = choice.get(key) if isinstance(choice, dict) else None
            if isinstance(part, dict):
                if isinstance(part.get("content"), str):
                    chars += len(part["content"])
                if isinstance(part.get("tool_calls"), list):
                    chars += len(json.dumps(part["tool_calls"]))
            elif isinstance(choice, dict) and isinstance(choice.get("text"), str):
                chars += len(choice["text"])
    return chars


class Meter:
    """Finds the real usage of a response: the usage chunk of a stream (dropped when
    the proxy asked for it on the client's behalf) or the usage of a JSON body."""

    def __init__(self, hide_usage: bool) -> None:
        self.hide_usage = hide_usage
        self.usage: dict[str, Any] | None = None
        self.chars = 0
        self.completed = False

    def on_event(self, event: sse.Event) -> list[sse.Event]:
        doc = event.json()
        if not isinstance(doc, dict):
            return [event]
        usage = doc.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
            if self.hide_usage and doc.get("choices") == []:
                return []
        self.chars += _content_chars(doc.get("choices"), "delta")
        return [event]

    def on_end(self) -> list[sse.Event]:
        return []

    def on_complete(self, ex: Exchange) -> None:
        doc = ex.completion
        if not isinstance(doc, dict):
            return
        self.completed = True
        usage = doc.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        elif self.usage is not None:
            # the usage chunk was hidden from the client: later callbacks still see it
            doc["usage"] = self.usage
        if not ex.stream:
            self.chars = _content_chars(doc.get("choices"), "message")

    def actual(self, ex: Exchange, est: Estimate) -> int:
        """The tokens the request used, as well as the proxy can tell."""
        total = usage_total(self.usage)
        if total is not None:
            return total
        if ex.ttfb is None or not (200 <= ex.status < 300):
            return 0  # the backend refused it or never answered
        if self.completed or ex.stream:
            return est.prompt + math.ceil(self.chars / 4)
        return est.total


def attach(ex: Exchange, body: dict[str, Any], stream_usage: bool) -> Meter:
    """A meter on the response of `ex`, whose request `body` is JSON. With
    `stream_usage`, a chat stream asks the backend for its usage chunk, which the
    meter hides again when the client did not ask for it."""
    hide = False
    if ex.route is CHAT and ex.wants_stream and stream_usage:
        opts = body.get("stream_options")
        if not (isinstance(opts, dict) and opts.get("include_usage") is True):
            body["stream_options"] = {
                **(opts if isinstance(opts, dict) else {}),
                "include_usage": True,
            }
            hide = True
    meter = Meter(hide)
    ex.event_transforms.append(meter)
    ex.on_complete.append(meter.on_complete)
    return meter


__all__ = ["Meter", "attach", "usage_total"]
