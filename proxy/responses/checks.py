"""The small checks of a Responses request's values, each a 400 naming its parameter."""

from __future__ import annotations

import math
import secrets
from typing import Any

from proxy.errors import ProxyError, invalid_type, invalid_value

# --- -------------------------------------------------------------------


def missing(param: str, why: str = "") -> ProxyError:
    return ProxyError(
        400,
        f"Missing required parameter: '{param}'." + (f" {why}" if why else ""),
        param=param,
        code="missing_required_parameter",
    )


def unsupported(param: str, message: str, code: str = "unsupported_parameter") -> ProxyError:
    return ProxyError(400, message, param=param, code=code)


def string(param: str, value: Any) -> str:
    if not isinstance(value, str):
        raise invalid_type(param, "a string", value)
    return value


def opt_string(param: str, value: Any) -> str | None:
    return None if value is None else string(param, value)


def boolean(param: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid_type(param, "a boolean", value)
    return value


def mapping(param: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid_type(param, "an object", value)
    return value


def array(param: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise invalid_type(param, "an array", value)
    return value


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
