"""Sessions on SQLite survive a restart and a `kill -9` of a real proxy process: the
turns are there (at most those of the last second lost), in order, the file passes
SQLite's integrity check, and a conversation continues where it stopped."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

from tests.hardening.fixtures import ProxyProcess, full_chain, request, sqlite_store


def turn(proxy: ProxyProcess, messages: list[dict[str, Any]], sid: str | None, stream: bool) -> Any:
    headers = [(b"X-Session-Id", sid.encode())] if sid else []
    body = {"model": "test-model", "messages": messages, "stream": stream}
    reply = request(proxy.port, "POST", "/v1/chat/completions", body, headers)
    assert reply.status == 200, reply.body[:300]
    if stream:
        text = "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            for line in reply.body.split(b"\n\n")
            if line.startswith(b"data: {")
        )
    else:
        text = reply.json()["choices"][0]["message"]["content"]
    return reply.headers["X-Session-Id"], text


def session(proxy: ProxyProcess, sid: str) -> dict[str, Any]:
    reply = request(proxy.port, "GET", f"/v1/sessions/{sid}")
    assert reply.status == 200, reply.body[:300]
    doc: dict[str, Any] = reply.json()
    return doc


def sent_texts(doc: dict[str, Any]) -> list[str]:
    return [m["content"] for t in doc["turns"] for m in t["messages"] if m["role"] == "user"]


def integrity(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(db)) as con:
        return str(con.execute("PRAGMA integrity_check").fetchone()[0])


def test_sessions_survive_kill_9_and_restart(tmp_path: Path, proxy_process: Any) -> None:
    db = tmp_path / "data" / "sessions.db"
    config = full_chain("echo:", sqlite_store(db))
    first = proxy_process(config, "first")

    # a session named by the client, and one found by matching the conversation
    pinned: list[str] = []
    for i in range(5):
        text = f"pinned turn {i}"
        sid, _ = turn(first, [{"role": "user", "content": text}], "durable-1", stream=i % 2 == 1)
        assert sid == "durable-1"
        pinned.append(text)
    history: list[dict[str, Any]] = []
    matched: str | None = None
    for i in range(3):
        history.append({"role": "user", "content": f"matched turn {i}"})
        sid, reply = turn(first, history, None, stream=i == 1)
        assert matched is None or sid == matched
        matched = sid
        history.append({"role": "assistant", "content": reply})
    assert matched is not None
    time.sleep(1.2)  # everything so far is older than a second at the kill

    late: list[str] = []
    for i in range(4):
        text = f"late turn {i}"
        turn(first, [{"role": "user", "content": text}], "durable-1", stream=False)
        late.append(text)
    assert first.proc is not None
    first.proc.send_signal(signal.SIGKILL)  # no drain, no flush
    first.proc.wait(10)

    assert integrity(db) == "ok"
    second = proxy_process(config, "second")
    doc = session(second, "durable-1")
    texts = sent_texts(doc)
    # all the early turns, then in order a prefix of the late ones: nothing out of order,
    # nothing missing in between, nothing doubled
    assert texts[:5] == pinned
    assert texts[5:] == late[: len(texts) - 5]
    assert doc["turn_count"] == len(texts)
    assert doc["usage"]["total_tokens"] == sum(t["usage"]["total_tokens"] for t in doc["turns"])
    doc = session(second, matched)
    assert sent_texts(doc) == [f"matched turn {i}" for i in range(3)]

    # the conversation found by matching continues in the new process
    history.append({"role": "user", "content": "after the crash"})
    sid, _ = turn(second, history, None, stream=False)
    assert sid == matched

    # a graceful stop right after a turn loses nothing
    turn(second, [{"role": "user", "content": "just before the stop"}], "durable-1", stream=True)
    assert second.terminate() == 0
    assert integrity(db) == "ok"
    third = proxy_process(config, "third")
    texts = sent_texts(session(third, "durable-1"))
    assert texts[-1] == "just before the stop"
    assert sent_texts(session(third, matched))[-1] == "after the crash"
    assert third.terminate() == 0


def test_many_kills_under_load_keep_the_file_sound(tmp_path: Path, proxy_process: Any) -> None:
    """kill -9 while turns are being written, three times: the file stays sound and
    every surviving session reads back whole."""
    db = tmp_path / "sessions.db"
    config = full_chain("echo:", sqlite_store(db))
    written = settled = 0  # settled: turns over a second old when their process died
    for round_ in range(3):
        proxy = proxy_process(config, f"round{round_}")
        for i in range(15):
            if i == 10:
                time.sleep(1.1)
                settled += 10
            turn(proxy, [{"role": "user", "content": f"r{round_} t{i}"}], f"load-{i % 3}", False)
            written += 1
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGKILL)
        proxy.proc.wait(10)
        assert integrity(db) == "ok"
    last = proxy_process(config, "last")
    total = 0
    for i in range(3):
        doc = session(last, f"load-{i}")
        assert len(doc["turns"]) == doc["turn_count"]
        total += doc["turn_count"]
    assert settled <= total <= written
