"""The cyclic garbage collector, watched and kept short.

Every collection is timed (gc.callbacks) into chat_proxy_gc_pause_seconds by
generation, with the longest in chat_proxy_gc_pause_max_seconds: a full collection
stops every stream in flight, so it is worth seeing. At start-up, once the
application is built, what it allocated is frozen (gc.freeze): the configuration,
the chain, the modules and their tables are never walked again.

The request path leaves nothing in reference cycles (tests/unit/test_gcwatch.py
counts it), so collections are triggered by allocation counts alone; what makes a
full collection long is how many tracked objects live. What survives a full
collection is frozen too (`survivors`, the default): long-lived data (the memory
store's sessions, caches, connections kept alive) is walked once, by the first full
collection after it was made, and never again, so a full collection walks only what
was promoted since the last one. Measured (bench/gc_thresholds.py, c=64 for 24 s,
the full chain; bench/results/gc-thresholds.md): with the memory store the longest
full collection took 123 ms of CPU with the start-up objects alone frozen (every
session walked, more of them each time), 3-5 ms with the survivors frozen; with the
SQLite store about 1 ms either way.

The price: cyclic garbage that holds an object frozen while it was alive (an object
of a request in flight at a full collection, say) is never found. Measured with
bench/soak.py's mixed traffic (errors, clients leaving mid-stream), about 430
objects a minute. So every `CHAT_PROXY_GC_UNFREEZE_SECONDS` (600) everything is
put back once, and the next full collection walks the whole heap and frees them (a
longer pause, once in that period: a few ms for the proxy's own start-up objects,
plus about 85 ns for each object a memory store holds).

The thresholds are left at Python's (700, 10, 10), by the same measurement: with
the memory store every young collection's survivors are walked again by the older
generations, so larger thresholds made young collections long (10,000/5/100: 3 ms
for gen0, 14 ms for gen1; 20,000/5/100: 8 and 29 ms; 700/10/10: at most about
1.3 ms); with the SQLite store they only spare the 1-4% of CPU time the many short
young collections cost.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import time
from typing import Any

from prometheus_client import Gauge, Histogram

log = logging.getLogger("chat_proxy")

PAUSES = Histogram(
    "chat_proxy_gc_pause_seconds",
    "Pauses of the cyclic garbage collector, by generation.",
    ["generation"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)
LONGEST = Gauge(
    "chat_proxy_gc_pause_max_seconds",
    "The longest pause of the cyclic garbage collector so far, by generation.",
    ["generation"],
    multiprocess_mode="max",
)

# one line per collection, `generation pause_seconds cpu_seconds`, appended to this
# file when it is set (for the bench; nothing is written, nor checked per collection,
# otherwise). The pause is wall time, what every stream in flight waits; the CPU time
# is the collector's own, less any time the process was not running.
LOG_ENV = "CHAT_PROXY_GC_LOG"
# the collector's thresholds, `gen0,gen1,gen2` (gc.set_threshold); Python's by default
THRESHOLD_ENV = "CHAT_PROXY_GC_THRESHOLD"
# what is frozen: `survivors` (the default: start-up objects, then what survives each
# full collection), `startup` (start-up objects only) or `0` (nothing)
FREEZE_ENV = "CHAT_PROXY_GC_FREEZE"
# survivors: every this many seconds, one full collection of everything
UNFREEZE_ENV = "CHAT_PROXY_GC_UNFREEZE_SECONDS"
UNFREEZE_SECONDS = 600.0

_survivors = False  # freeze what survives a full collection (armed by freeze())
_unfreeze_every = UNFREEZE_SECONDS
_unfrozen_at = 0.0
_walk_all = False  # everything was put back: the next full collection walks it all

_started: float = 0.0
_started_cpu: float = 0.0
_longest = [0.0, 0.0, 0.0]
_children: list[Any] = []
_log_fd = -1


def _record(generation: int, pause: float) -> None:
    if not 0 <= generation <= 2:
        return
    _children[generation].observe(pause)
    if pause > _longest[generation]:
        _longest[generation] = pause
        LONGEST.labels(str(generation)).set(pause)


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    global _started
    if phase == "start":
        _started = time.perf_counter()
        return
    generation = info.get("generation", 0)
    _record(generation, time.perf_counter() - _started)
    if generation == 2 and _survivors:
        _after_full()


def _on_gc_logged(phase: str, info: dict[str, Any]) -> None:
    global _started, _started_cpu
    if phase == "start":
        _started_cpu = time.thread_time()
        _started = time.perf_counter()
        return
    pause = time.perf_counter() - _started
    cpu = time.thread_time() - _started_cpu
    generation = info.get("generation", 0)
    _record(generation, pause)
    if generation == 2 and _survivors:
        _after_full()
    # one write(2) of a short line to an O_APPEND file: whole even with several workers
    os.write(_log_fd, b"%d %.6f %.6f\n" % (generation, pause, cpu))


def _after_full() -> None:
    """A full collection is over: freeze what it left (O(1), a list splice), unless
    the period is over, in which case everything goes back for the next one."""
    global _walk_all, _unfrozen_at
    now = time.monotonic()
    if not _walk_all and now - _unfrozen_at >= _unfreeze_every:
        gc.unfreeze()
        _walk_all = True
        _unfrozen_at = now
        return
    _walk_all = False
    gc.freeze()


def install() -> None:
    """Time every collection (once per process); with CHAT_PROXY_GC_LOG set, also
    append each one to that file."""
    global _log_fd
    if _on_gc in gc.callbacks or _on_gc_logged in gc.callbacks:
        return
    _children[:] = [PAUSES.labels(str(g)) for g in range(3)]
    for g in range(3):
        LONGEST.labels(str(g)).set(0.0)
    threshold = os.environ.get(THRESHOLD_ENV)
    if threshold:
        gc.set_threshold(*(int(x) for x in threshold.split(",")))
    path = os.environ.get(LOG_ENV)
    if path:
        _log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        gc.callbacks.append(_on_gc_logged)
    else:
        gc.callbacks.append(_on_gc)


def freeze() -> None:
    """At start-up: move everything alive now out of the collector's walk, and (by
    default) from now on what survives each full collection."""
    global _survivors, _unfreeze_every, _unfrozen_at
    mode = os.environ.get(FREEZE_ENV) or "survivors"
    if mode == "0":
        return
    gc.collect()
    gc.freeze()
    if mode == "survivors":
        _unfreeze_every = float(os.environ.get(UNFREEZE_ENV) or UNFREEZE_SECONDS)
        _unfrozen_at = time.monotonic()
        _survivors = True
    log.debug("start-up objects frozen", extra={"frozen": gc.get_freeze_count(), "mode": mode})


def raise_file_limit() -> int:
    """The soft limit on open files raised to the hard one; the limit now. Each
    stream holds two descriptors (the client's and the backend's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit: %s", exc)
    return soft
