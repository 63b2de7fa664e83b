"""The cyclic garbage collector, watched and kept short.

Every collection is timed (gc.callbacks) into chat_proxy_gc_pause_seconds by
generation, with the longest in chat_proxy_gc_pause_max_seconds: a full collection
stops every stream in flight, so it is worth seeing. At start-up, once the
application is built, what it allocated is frozen (gc.freeze): the configuration,
the chain, the modules and their tables are never walked again.

The request path leaves nothing in reference cycles (tests/unit/test_gcwatch.py
counts it), so collections are triggered by allocation counts alone; what makes a
full collection long is how many tracked objects live, which is why the memory store
keeps turns as text.
"""

from __future__ import annotations

import gc
import logging
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

_started: float = 0.0
_longest = [0.0, 0.0, 0.0]
_children: list[Any] = []


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    global _started
    if phase == "start":
        _started = time.perf_counter()
        return
    pause = time.perf_counter() - _started
    generation = info.get("generation", 0)
    if not 0 <= generation <= 2:
        return
    _children[generation].observe(pause)
    if pause > _longest[generation]:
        _longest[generation] = pause
        LONGEST.labels(str(generation)).set(pause)


def install() -> None:
    """Time every collection (once per process)."""
    if _on_gc in gc.callbacks:
        return
    _children[:] = [PAUSES.labels(str(g)) for g in range(3)]
    for g in range(3):
        LONGEST.labels(str(g)).set(0.0)
    gc.callbacks.append(_on_gc)


def freeze() -> None:
    """Move everything alive now out of the collector's walk for good."""
    gc.collect()
    gc.freeze()
    log.debug("start-up objects frozen", extra={"frozen": gc.get_freeze_count()})


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
