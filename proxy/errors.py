"""Errors in the OpenAI shape, and the mapping of backend errors to it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


OPENAI_TYPES = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "rate_limit_error",
        "api_error",
        "server_error",
    }
)


def error_type_for(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "api_error")


class ProxyError(Exception):
    """An error the client sees as `{"error": {...}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type_for(status)
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()

    def response(self, extra_headers: Mapping[str, str] | None = None) -> web.Response:
        headers = dict(extra_headers or {})
        headers.update(self.headers)
        return web.Response(
            status=self.status,
            body=self.to_bytes(),
            content_type="application/json",
            headers=headers,
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ProxyError:
    return ProxyError(400, message, param=param, code=code)


def not_found(message: str = "Not found.") -> ProxyError:
    return ProxyError(404, message, code="not_found")


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def normalise_backend_error(status: int, body: bytes) -> ProxyError:
    """Turn any backend error body into the OpenAI shape, keeping its message.

    Handles the OpenAI shape itself, vLLM's `{"error": "Unauthorized"}`, Ollama's
    `{"error": "model 'x' not found"}`, FastAPI's `{"detail": ...}`, llama.cpp's
    `{"error": {"code", "message", "type"}}` and plain text.
    """
    mapped = status if 400 <= status < 600 else 502
    message: str | None = None
    etype: str | None = None
    param: str | None = None
    code: str | None = None
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        err = doc.get("error", doc.get("detail"))
        if isinstance(err, dict):
            message = _text(err.get("message")) or _text(err.get("msg"))
            etype = _text(err.get("type"))
            param = _text(err.get("param"))
            raw_code = err.get("code")
            code = str(raw_code) if isinstance(raw_code, (str, int)) else None
        elif isinstance(err, str):
            message = _text(err)
        elif isinstance(err, list) and err:
            message = "; ".join(
                str(e.get("msg", e)) if isinstance(e, dict) else str(e) for e in err
            )
        if message is None:
            message = _text(doc.get("message"))
    elif body and doc is None:
        try:
            message = _text(body.decode("utf-8", "replace")[:500])
        except Exception:  # pragma: no cover - decode with replace does not raise
            message = None
    if message is None:
        message = f"The backend answered with status {status}."
    if etype is None or mapped >= 500 or mapped in (401, 403, 429):
        etype = error_type_for(mapped)
    if code is not None and code.isdigit():
        code = None
    return ProxyError(mapped, message, type=etype, param=param, code=code)


def sse_error_event(err: ProxyError) -> bytes:
    """The error as one SSE event, for errors after a stream has started."""
    return b"data: " + err.to_bytes() + b"\n\n"


def normalise_error_payload(payload: Any, other_field: str | None = None) -> dict[str, Any] | None:
    """An error found in a stream, in the OpenAI shape; None when it is not an error
    or already has that shape.

    Covers llama.cpp's `error: {...}` SSE field (passed as `other_field`), vLLM's
    `{"object": "error", "message": ...}` and `{"error": "text"}`, and error objects
    that lack some of the OpenAI fields."""
    if other_field is not None:
        try:
            doc = json.loads(other_field)
        except ValueError:
            doc = {"message": other_field}
        inner = doc.get("error", doc) if isinstance(doc, dict) else {"message": str(doc)}
        return _shape(inner if isinstance(inner, dict) else {"message": str(inner)})
    if not isinstance(payload, dict):
        return None
    if payload.get("object") == "error":
        return _shape(payload)
    err = payload.get("error")
    if err is None or "choices" in payload:
        return None
    if isinstance(err, str):
        return _shape({"message": err})
    if isinstance(err, dict):
        if (
            all(k in err for k in ("message", "type", "param", "code"))
            and isinstance(err["message"], str)
            and err["type"] in OPENAI_TYPES
            and "object" not in err
        ):
            return None
        return _shape(err)
    return _shape({"message": str(err)})


def _shape(doc: dict[str, Any]) -> dict[str, Any]:
    raw_status = doc.get("code")
    status = raw_status if isinstance(raw_status, int) and 400 <= raw_status < 600 else 500
    message = _text(doc.get("message")) or "The backend reported an error."
    etype = _text(doc.get("type"))
    if (
        etype is None
        or status >= 500
        or etype in ("server_error", "BadRequestError", "InternalServerError")
    ):
        etype = error_type_for(status)
    code = doc.get("code")
    return {
        "error": {
            "message": message,
            "type": etype,
            "param": _text(doc.get("param")),
            "code": code if isinstance(code, str) else None,
        }
    }


_HTTP_ERROR_INSTALLED = False


def install_http_error_shape() -> None:
    """Answer a request the HTTP parser refuses (a malformed request line or header)
    in the OpenAI error shape, like every other error, instead of aiohttp's plain
    text, which quotes the offending bytes back. Once per process; aiohttp keeps its
    logging (which proxy/observability.py trims to the kind of error)."""
    global _HTTP_ERROR_INSTALLED
    if _HTTP_ERROR_INSTALLED:
        return
    from aiohttp.web_protocol import RequestHandler

    original = RequestHandler.handle_error

    def handle_error(
        self: RequestHandler,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        plain = original(self, request, status, exc, message)
        if status >= 500:
            err = ProxyError(
                status, "The proxy failed to handle this request.", code="internal_error"
            )
        else:
            # the kind of error only: what follows the colon quotes the client's bytes
            kind = (message or "").split("\n", 1)[0].split(":", 1)[0].strip()[:100]
            err = ProxyError(
                status,
                f"The request is not valid HTTP ({kind})."
                if kind
                else "The request is not valid HTTP.",
                code="invalid_http",
            )
        resp = err.response()
        if not plain.keep_alive:
            resp.force_close()
        return resp

    RequestHandler.handle_error = handle_error  # type: ignore[method-assign]
    _HTTP_ERROR_INSTALLED = True


# -- a JSON value of the wrong type or value, as the parameter checks report it --


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def invalid_type(param: str, expected: str, value: Any) -> ProxyError:
    return ProxyError(
        400,
        f"Invalid type for '{param}': expected {expected}, got {_kind(value)}.",
        param=param,
        code="invalid_type",
    )


def invalid_value(param: str, expected: str, value: Any) -> ProxyError:
    return ProxyError(
        400,
        f"Invalid value for '{param}': expected {expected}, got {_show(value)}.",
        param=param,
        code="invalid_value",
    )
