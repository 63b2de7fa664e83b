"""Handing the allocator's free memory back to the system.

A proxy allocates and frees many short-lived buffers; glibc keeps freed memory in its
arenas, so the resident size creeps up over hours although nothing is held. Every
`server.trim_memory_seconds` the proxy calls glibc's `malloc_trim(0)` (about a
millisecond), which returns that free memory. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import sys
import time
from collections.abc import Callable

log = logging.getLogger("chat_proxy")


def _load_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None
    return trim


malloc_trim = _load_trim()


async def trim_periodically(every: float) -> None:
    """Run until cancelled: malloc_trim(0) every `every` seconds."""
    if malloc_trim is None or every <= 0:
        return
    while True:
        await asyncio.sleep(every)
        started = time.perf_counter()
        malloc_trim(0)
        log.debug("memory trimmed", extra={"ms": round((time.perf_counter() - started) * 1000, 2)})


def start(every: float) -> asyncio.Task[None] | None:
    if malloc_trim is None or every <= 0:
        return None
    return asyncio.get_running_loop().create_task(trim_periodically(every))


async def stop(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
