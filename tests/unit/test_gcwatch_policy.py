"""What proxy/gcwatch.py does to the collector, in processes of their own (it changes
the interpreter's collector for good): what is frozen under each `CHAT_PROXY_GC_FREEZE`
policy, the thresholds, the periodic thaw, and the one line per collection of
`CHAT_PROXY_GC_LOG`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import gc, json, time
from proxy import gcwatch
gcwatch.install()
gcwatch.freeze()
after_start = gc.get_freeze_count()
threshold = gc.get_threshold()
# long-lived data made after start-up, in reference cycles' reach (containers)
kept = [{"i": i, "l": [i]} for i in range(20000)]
gc.collect()
after_full = gc.get_freeze_count()
time.sleep(float(__import__("os").environ.get("PROBE_SLEEP", "0")))
gc.collect()
after_second = gc.get_freeze_count()
gc.collect()
after_third = gc.get_freeze_count()
print(json.dumps({"start": after_start, "full": after_full, "second": after_second,
                  "third": after_third, "threshold": threshold}))
"""


def probe(env: dict[str, str]) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_GC")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_survivors_are_frozen_after_each_full_collection_by_default() -> None:
    r = probe({})
    assert r["start"] > 0  # what start-up allocated
    # the 40,000 containers made after start survive the full collection: frozen too
    assert r["full"] >= r["start"] + 40000
    assert r["threshold"] == [700, 10, 2]


def test_startup_freezes_only_what_start_up_allocated() -> None:
    r = probe({"CHAT_PROXY_GC_FREEZE": "startup"})
    assert r["start"] > 0
    assert r["full"] == r["start"] == r["third"]
    assert r["threshold"] == [700, 10, 10]  # Python's own


def test_zero_freezes_nothing() -> None:
    r = probe({"CHAT_PROXY_GC_FREEZE": "0"})
    assert r["start"] == r["full"] == r["third"] == 0


def test_the_thresholds_can_be_set() -> None:
    r = probe({"CHAT_PROXY_GC_THRESHOLD": "5000,20,5"})
    assert r["threshold"] == [5000, 20, 5]


def test_everything_is_thawed_once_a_period_then_frozen_again() -> None:
    r = probe({"CHAT_PROXY_GC_UNFREEZE_SECONDS": "0.2", "PROBE_SLEEP": "0.3"})
    assert r["full"] >= r["start"] + 40000
    # the period over: the next full collection puts everything back to be walked
    assert r["second"] == 0
    # and the one after it walks it all once (freeing what was frozen garbage), then
    # freezes what survived
    assert r["third"] > 40000


def test_the_log_has_one_line_per_collection(tmp_path: Path) -> None:
    log = tmp_path / "gc.log"
    script = (
        "import gc\nfrom proxy import gcwatch\ngcwatch.install()\n"
        "for g in (0, 1, 2, 2):\n    gc.collect(g)\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_GC")}
    subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**clean, "CHAT_PROXY_GC_LOG": str(log)},
        check=True,
        timeout=60,
    )
    lines = [line.split() for line in log.read_text().splitlines()]
    # the four collections asked for (and any the interpreter made by itself)
    gens = [int(parts[0]) for parts in lines]
    assert gens.count(2) >= 2 and 0 in gens and 1 in gens
    for parts in lines:
        assert len(parts) == 3
        pause, cpu = float(parts[1]), float(parts[2])
        assert 0 <= pause < 5 and 0 <= cpu < 5
