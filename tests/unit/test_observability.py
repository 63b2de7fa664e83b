"""Log lines: the direct access-line path writes what the logging path writes."""

from __future__ import annotations

import io
import json
import logging

from proxy.observability import (
    BufferedHandler,
    JsonFormatter,
    RequestIdFilter,
    access_log,
    new_request_id,
    write_access_line,
)


def test_direct_access_line_matches_the_logging_path() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    handler = BufferedHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    fields = {"request_id": "r1", "status": 200, "model": "m", "stream": False, "latency_ms": 1.5}
    try:
        assert write_access_line(dict(fields)) is True
        access_log.info("request", extra=dict(fields))
        handler.flush()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    direct, logged = (json.loads(line) for line in out.getvalue().splitlines())
    direct.pop("ts"), logged.pop("ts")
    assert direct == logged
    assert direct["logger"] == "chat_proxy.access" and direct["msg"] == "request"


def test_direct_path_steps_aside_for_other_handlers() -> None:
    root = logging.getLogger()
    extra = logging.NullHandler()
    root.addHandler(extra)
    try:
        assert write_access_line({"request_id": "r"}) is False
    finally:
        root.removeHandler(extra)


def test_request_ids_are_unique_and_hex() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for rid in ids:
        assert rid.startswith("req_") and len(rid) == 36
        int(rid[4:], 16)
