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
was promoted since the last one; and full collections come every second young
collection of the middle generation (thresholds 700, 10, 2) rather than every tenth,
so that each walks less. Measured (bench/gc_thresholds.py, the full chain at c=64
for 24 s, the machine otherwise idle; bench/results/gc-thresholds.md), the longest
pause with the SQLite store / the memory store:

- nothing frozen: 24 / 147 ms (p99 2.1 / 6.0 times the bare relay's);
- start-up objects frozen: 2.3 / 111 ms (the memory store's sessions walked by every
  full collection, more of them each time; p99 1.0 / 3.9 times);
- survivors frozen, Python's thresholds (700, 10, 10): 2.2 / 3.0 ms (p99 1.0 / 1.0);
- survivors frozen, (700, 10, 2): 1.8 / 1.3 ms (p99 1.0 / 0.9), the same throughput;
  and with 10,000 streams opening over 10 s (two workers), 29 ms instead of 64 ms of
  CPU for the longest full collection;
- larger young thresholds, (10,000, 5, 100) or (50,000, 20, 100): 0.8 / 13 ms and
  0 / 11 ms: with the memory store every request leaves survivors that each young
  collection walks again; with SQLite they spare the 5-7% of throughput that the
  many short young collections cost.

The price of freezing survivors: cyclic garbage that holds an object frozen while it
was alive (an object of a request in flight at a full collection) is never found.
Measured with bench/soak.py's mixed traffic (errors, clients leaving mid-stream):
about 430 objects a minute. So every `CHAT_PROXY_GC_UNFREEZE_SECONDS` (600)
everything is put back once, and the next full collection walks the whole heap and
frees them: one longer pause in that period (a few ms for the proxy's own start-up
objects, plus every object a memory store or the streams in flight hold).
"""

from __future__ import annotations

import gc
import logging
import os
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
# the collector's thresholds, `gen0,gen1,gen2` (gc.set_threshold); with survivors
# frozen, THRESHOLD by default
THRESHOLD_ENV = "CHAT_PROXY_GC_THRESHOLD"
THRESHOLD = (700, 10, 2)
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
        if not os.environ.get(THRESHOLD_ENV):
            gc.set_threshold(*THRESHOLD)  # a full collection now walks little: more often
        _unfreeze_every = float(os.environ.get(UNFREEZE_ENV) or UNFREEZE_SECONDS)
        _unfrozen_at = time.monotonic()
        _survivors = True
    log.debug("start-up objects frozen", extra={"frozen": gc.get_freeze_count(), "mode": mode})
