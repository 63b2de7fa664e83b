"""Logs as JSON lines, request ids, and the access log."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import logging
import os
import sys
import time
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any extra fields."""

    _second = -1
    _stamp = ""

    def stamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def _ts(self, record: logging.LogRecord) -> str:
        return self.stamp(record.created)

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": self._ts(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(doc, default=str).decode()
        except TypeError:  # an integer beyond 64 bits, a lone surrogate
            return json.dumps(doc, default=str, ensure_ascii=False)


class HttpParserErrors(logging.Filter):
    """aiohttp logs a request it cannot parse with a traceback quoting the offending
    line, which may be a header holding an API key: keep only the kind of error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "refused a malformed HTTP request (%s)"
            record.args = (type(exc).__name__,)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


logging.getLogger("aiohttp.server").addFilter(HttpParserErrors())


class BufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes log lines in batches: inside a running event loop, lines of level INFO
    and below are written within 0.1 s (or at 64 KiB), like nginx's buffered access
    log; warnings and errors are written at once, as is everything outside a loop."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.add_line(line, record.levelno)

    def add_line(self, line: str, level: int) -> None:
        self._lines.append(line)
        self._size += len(line)
        if level >= logging.WARNING or self._size >= 65536:
            self.flush()
            return
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(0.1, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = "\n".join(self._lines) + "\n"
        self._lines.clear()
        self._size = 0
        self.acquire()
        try:
            self.stream.write(data)
            self.stream.flush()
        except Exception:  # pragma: no cover - a closed stderr
            pass
        finally:
            self.release()


def setup_logging(level: str = "info", stream: Any = None) -> None:
    handler = BufferedHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


access_log = logging.getLogger("chat_proxy.access")


def write_access_line(fields: dict[str, Any]) -> bool:
    """Write an access line straight to the log handler, as the JSON formatter would
    have written it, skipping the logging machinery (a tenth of the CPU time of a
    relayed request). Only where the process logs through setup_logging's handler
    alone; anywhere else (a test capturing records, another handler) it returns False
    and the caller logs the line as usual."""
    handlers = _ROOT.handlers
    if len(handlers) != 1 or access_log.handlers:
        return False
    handler = handlers[0]
    if type(handler) is not BufferedHandler or not isinstance(handler.formatter, JsonFormatter):
        return False
    now = time.time()
    doc: dict[str, Any] = {
        "ts": handler.formatter.stamp(now),
        "level": "info",
        "logger": "chat_proxy.access",
        "pid": _PID,
        "msg": "request",
    }
    doc.update(fields)
    try:
        line = orjson.dumps(doc, default=str).decode()
    except TypeError:
        line = json.dumps(doc, default=str, ensure_ascii=False)
    handler.add_line(line, logging.INFO)
    return True


_ROOT = logging.getLogger()
_PID = os.getpid()

# the id of the request being handled, added to every log line written meanwhile
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "chat_proxy_request_id", default=None
)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            rid = current_request_id.get()
            if rid is not None:
                record.request_id = rid
        return True


_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """Unique without a system call per request: a random per-process prefix and a
    counter."""
    return f"req_{_ID_PREFIX}{next(_ID_COUNTER):020x}"


def clean_request_id(value: str | None) -> str:
    """Keep a client's request id when it is printable and short; else make one."""
    if value and len(value) <= 128 and value.isascii() and value.isprintable():
        return value
    return new_request_id()
