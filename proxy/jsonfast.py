"""JSON on the hot path: orjson where the document allows it, the standard library
otherwise (NaN, Infinity and integers beyond 64 bits, which orjson refuses but the
standard parser accepts so that `validate` can name the field that holds them)."""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson


def loads(data: bytes | str) -> Any:
    """Parse JSON; raises ValueError (or RecursionError) like json.loads."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, in a bytes object of its own size: orjson's result holds
    the buffer it wrote into (4 KiB for a short document, 2.6 times a 100 KB one),
    and a request body encoded for the backend lives as long as its stream."""
    try:
        return bytes(memoryview(orjson.dumps(value)))
    except TypeError:  # an integer beyond 64 bits, for example
        # backslashreplace: a lone surrogate goes out as the escape it came in as
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "backslashreplace"
        )


def dumps_str(value: Any) -> str:
    return dumps(value).decode()


def copy_tree(value: Any) -> Any:
    """A deep copy of a JSON tree (dicts, lists and immutable scalars): what
    copy.deepcopy gives, several times faster; anything else goes to deepcopy."""
    kind = type(value)
    if kind is dict:
        return {k: copy_tree(v) for k, v in value.items()}
    if kind is list:
        return [copy_tree(v) for v in value]
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    return copy.deepcopy(value)


def plain_tree(value: Any) -> bool | None:
    """True when a tree holds only dicts, lists, strings, integers, booleans, None and
    finite floats; False at a NaN or an infinity; None at any other kind of value."""
    stack = [value]
    pop = stack.pop
    push = stack.extend
    while stack:
        node = pop()
        kind = type(node)
        if kind is str:
            continue
        if kind is dict:
            push(node.values())
        elif kind is list:
            push(node)
        elif kind is float:
            if node - node != 0.0:  # NaN or an infinity
                return False
        elif kind is not int and kind is not bool and node is not None:
            return None
    return True
