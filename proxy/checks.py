"""The small checks of a request's values that every API shares, each a 400 in the
OpenAI shape naming its parameter: the Chat Completions checks (proxy/middleware/
validate.py) and the Responses translation's (proxy/responses/) alike."""

from __future__ import annotations

from typing import Any

from proxy.errors import ProxyError, invalid_type


def missing(param: str, why: str = "") -> ProxyError:
    return ProxyError(
        400,
        f"Missing required parameter: '{param}'." + (f" {why}" if why else ""),
        param=param,
        code="missing_required_parameter",
    )


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
