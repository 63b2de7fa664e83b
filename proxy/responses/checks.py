"""The checks of a Responses request's values of its own, each a 400 naming its parameter
(those every API shares are in proxy/checks.py)."""

from __future__ import annotations

import math
import secrets
from typing import Any

from proxy.errors import ProxyError, invalid_type, invalid_value

# --- -------------------------------------------------------------------


def unsupported(param: str, message: str, code: str = "unsupported_parameter") -> ProxyError:
    return ProxyError(400, message, param=param, code=code)


def number(param: str, value: Any, lo: float, hi: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid_type(param, "a number", value)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise invalid_value(param, f"a number between {lo:g} and {hi:g}", value)
    return value


def integer(param: str, value: Any, lo: int, hi: int = 2**53 - 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_type(param, "an integer", value)
    if not lo <= value <= hi:
        raise invalid_value(param, f"an integer between {lo} and {hi}", value)
    return value


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"
