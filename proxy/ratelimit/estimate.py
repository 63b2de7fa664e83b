"""The tokens a request is reckoned at when it is admitted, before the backend says.

A token is about 4 characters, plus a few per message for the chat template and a
flat amount per image; the completion part is the request's max_tokens (times `n`)
or the middleware's `default_max_tokens` for a route that generates.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from proxy.exchange import Exchange
from proxy.routes import CHAT

_IMAGE_TOKENS = 85  # what an image part of a message is reckoned at


def _chars(value: Any) -> tuple[int, int]:
    """(characters of text, image parts) in a message content or a prompt input."""
    if isinstance(value, str):
        return len(value), 0
    chars = images = 0
    if isinstance(value, list):
        for part in value:
            if isinstance(part, str):
                chars += len(part)
            elif isinstance(part, int):
                chars += 4  # a token id of a pre-tokenised prompt
            elif isinstance(part, list):
                chars += 4 * len(part)
            elif isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    chars += len(part["text"])
                elif part.get("type") in ("image_url", "input_image", "image"):
                    images += 1
                else:
                    chars += len(json.dumps(part))
    return chars, images


def estimate_prompt(body: dict[str, Any] | None) -> int:
    """A cheap estimate of a request's prompt tokens: a token is about 4 characters,
    plus a few per message for the chat template."""
    if body is None:
        return 0
    chars = images = items = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for msg in messages:
            if not isinstance(msg, dict):
                continue
            items += 1
            content = msg.get("content")
            if type(content) is str:
                chars += len(content)
            elif content is not None:
                c, i = _chars(content)
                chars += c
                images += i
            calls = msg.get("tool_calls")
            if calls is not None and isinstance(calls, list):
                chars += len(json.dumps(calls))
        if isinstance(body.get("tools"), list):
            chars += len(json.dumps(body["tools"]))
    for name in ("prompt", "input"):
        value = body.get(name)
        if value is not None:
            c, i = _chars(value)
            chars += c
            images += i
    if not chars and not images and not items:
        return 0
    return math.ceil(chars / 4) + 4 * items + 3 + _IMAGE_TOKENS * images


def positive_int(value: Any) -> int | None:
    """`value` when it is a positive int (not a bool), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


@dataclass(slots=True)
class Estimate:
    prompt: int
    completion: int
    explicit: bool  # the completion part comes from the request's max_tokens

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def estimate(ex: Exchange, default_max_tokens: int) -> Estimate:
    body = ex.body
    prompt = estimate_prompt(body)
    if body is None:
        return Estimate(prompt, 0, False)
    value = body.get("n")
    n = 1 if value is None else positive_int(value) or 1
    value = body.get("max_completion_tokens")
    limit = None if value is None else positive_int(value)
    if limit is None:
        limit = positive_int(body.get("max_tokens"))
    if limit is not None:
        return Estimate(prompt, limit * n, True)
    generates = ex.route is CHAT or ex.request.path.endswith("/completions")
    return Estimate(prompt, default_max_tokens * n if generates else 0, False)


__all__ = ["Estimate", "estimate", "estimate_prompt", "positive_int"]
