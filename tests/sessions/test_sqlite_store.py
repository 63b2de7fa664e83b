"""The SQLite store's file: a writer killed mid-stream leaves it consistent."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


_WRITER = """
import asyncio, sys
from proxy.sessions.store.sqlite import SQLiteStore
from proxy.sessions.store.base import TurnRecord

async def main() -> None:
    store = await SQLiteStore.open(sys.argv[1])
    i = 0
    while True:
        batch = []
        for _ in range(5):
            i += 1
            batch.append(TurnRecord(owner="o", session_id=f"s{i % 7}", at=float(i), source="new",
                key_id=None, model="m", turn={"n": i, "pad": "x" * 4000}, total_tokens=1,
                digests=(f"d{i}",)))
        await store.record_turns(batch)
        print(i, flush=True)

asyncio.run(main())
"""


def test_sqlite_file_survives_kill_9(tmp_path: Path) -> None:
    """A writer killed mid-stream leaves a consistent file holding every turn it had
    committed."""
    db = tmp_path / "sessions.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    acknowledged = 0
    try:
        for line in proc.stdout:
            acknowledged = int(line)
            if acknowledged >= 600:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert acknowledged >= 600
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        turns = con.execute("SELECT count(*) FROM turns").fetchone()[0]
        counted, tokens = con.execute(
            "SELECT sum(turn_count), sum(total_tokens) FROM sessions"
        ).fetchone()
    finally:
        con.close()
    assert turns >= acknowledged
    assert counted == turns == tokens
