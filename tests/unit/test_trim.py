"""server.trim_memory_seconds: glibc's free memory handed back periodically."""

from __future__ import annotations

import asyncio
import sys

import pytest

from proxy import trim as memory
from proxy.loader import load_text


def test_the_default_is_every_minute_and_zero_turns_it_off() -> None:
    base = "upstreams: [{name: a, url: 'echo:'}]\n"
    assert load_text(base).server.trim_memory_seconds == 60
    assert load_text(base + "server: {trim_memory_seconds: 0}\n").server.trim_memory_seconds == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
async def test_the_trimmer_calls_malloc_trim_until_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert memory.malloc_trim is not None  # glibc here
    calls: list[int] = []
    real = memory.malloc_trim

    def counting(pad: int) -> int:
        calls.append(pad)
        return real(pad)

    monkeypatch.setattr(memory, "malloc_trim", counting)
    task = memory.start(0.01)
    assert task is not None
    await asyncio.sleep(0.1)
    await memory.stop(task)
    seen = len(calls)
    assert seen >= 3 and set(calls) == {0}
    await asyncio.sleep(0.05)
    assert len(calls) == seen  # stopped
    assert memory.start(0) is None


def test_malloc_trim_hands_free_memory_back() -> None:
    if memory.malloc_trim is None:
        pytest.skip("no glibc malloc_trim")

    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    # 200 MB of buffers freed but for one in 500, which pins the heap's top: glibc
    # keeps the pages until trimmed
    blocks = [bytes(4000) + bytes([i % 256]) for i in range(50_000)]
    keep = blocks[::500]
    del blocks
    before = rss_kib()
    memory.malloc_trim(0)
    after = rss_kib()
    assert keep and before - after > 100 * 1024
