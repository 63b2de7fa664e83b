"""The load signal: each replica's own account of its work, read from its Prometheus
/metrics every `interval` seconds.

- vLLM (`vllm`): `vllm:num_requests_running`, `vllm:num_requests_waiting` and the
  KV-cache usage, `vllm:kv_cache_usage_perc` (v1 engines) or, on older versions,
  `vllm:gpu_cache_usage_perc` (a 0..1 ratio whatever the name; where both are
  exposed, as during the rename, they hold the same value and the new one is read).
- llama.cpp server, `llama-server --metrics` (`llamacpp`):
  `llamacpp:requests_processing`, `llamacpp:requests_deferred` and, on the builds
  that still have it, `llamacpp:kv_cache_usage_ratio`.

A gauge exposed under several label sets (several `model_name`, or one `engine` per
data-parallel rank) counts the sum of its requests and the mean of its KV-cache
usage, which stays a 0..1 ratio.

A replica whose metrics cannot be read (no connection, past the timeout, not a 200,
a body over `MAX_BODY`, text that does not parse, none of the expected gauges) has
`engine` None until it can be read again: the choice among replicas then counts the
proxy's own in-flight requests for it. It goes on serving either way. Its first
failure logs one warning, its recovery one info line; the rounds between log
nothing. Logs name the replica by its index, never by its address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from prometheus_client.parser import text_string_to_metric_families

from proxy.backend import BackendClient, BodyTooLarge, ClientError

__all__ = ["MAX_BODY", "EngineLoad", "LoadPoller", "MetricsKind", "Polled", "parse_metrics"]

log = logging.getLogger("chat_proxy.fleet")

# a metrics page longer than this is not read
MAX_BODY = 1 << 20

MetricsKind = Literal["vllm", "llamacpp"]


@dataclass(slots=True)
class EngineLoad:
    """What one replica's engine reports: requests running and waiting, and the share
    of its KV cache in use."""

    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float | None = None  # 0..1, None when the engine does not report it

    @property
    def requests(self) -> float:
        return self.running + self.waiting


@dataclass(frozen=True, slots=True)
class _Names:
    running: str
    waiting: str
    kv: tuple[str, ...]  # in order of preference: the first one present is read


_NAMES: dict[str, _Names] = {
    "vllm": _Names(
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    ),
    "llamacpp": _Names(
        "llamacpp:requests_processing",
        "llamacpp:requests_deferred",
        ("llamacpp:kv_cache_usage_ratio",),
    ),
}


def parse_metrics(kind: MetricsKind, text: str) -> EngineLoad:
    """The load in a Prometheus text exposition from an engine of `kind`.

    ValueError when the text does not parse, or holds none of the kind's request
    gauges (a sample that is not a finite number does not count)."""
    names = _NAMES.get(kind)
    if names is None:
        raise ValueError(f"unknown metrics kind {kind!r}")
    wanted = {names.running, names.waiting, *names.kv}
    values: dict[str, list[float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted and math.isfinite(sample.value):
                    values.setdefault(sample.name, []).append(float(sample.value))
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise ValueError(f"the metrics text does not parse: {str(exc)[:200]}") from None
    running = values.get(names.running)
    waiting = values.get(names.waiting)
    if running is None and waiting is None:
        raise ValueError(f"none of {names.running}, {names.waiting} in the metrics text")
    kv_usage = None
    for name in names.kv:
        kv = values.get(name)
        if kv:
            kv_usage = min(max(sum(kv) / len(kv), 0.0), 1.0)
            break
    return EngineLoad(
        running=max(sum(running or ()), 0.0),
        waiting=max(sum(waiting or ()), 0.0),
        kv_usage=kv_usage,
    )


class Polled(Protocol):
    """One replica as the poller sees it."""

    index: int  # the replica's index in its upstream (logs use it; never its address)
    pool: BackendClient | None  # its own connection pool; None while stopped (skipped)
    metrics_target: str  # the request-target of its /metrics, e.g. "/metrics"
    engine: EngineLoad | None  # written by the poller: the last load read, or None


class _Unreadable(Exception):
    """The replica's metrics could not be read; the message says why (for the log:
    it never holds the replica's address)."""


_HEADERS = [("Accept", "text/plain"), ("Accept-Encoding", "identity")]


class LoadPoller:
    """Polls the /metrics of every replica of one upstream, all at once, every
    `interval` seconds, each within `timeout` seconds (default: the interval, at most
    2 s), and writes what it reads into each replica's `engine`."""

    def __init__(
        self,
        upstream: str,
        kind: MetricsKind,
        interval: float,
        replicas: Sequence[Polled],
        timeout: float | None = None,
    ) -> None:
        if kind not in _NAMES:
            raise ValueError(f"unknown metrics kind {kind!r}")
        if not interval > 0:
            raise ValueError("the poll interval must be positive")
        if timeout is None:
            timeout = min(interval, 2.0)
        if not timeout > 0:
            raise ValueError("the poll timeout must be positive")
        self.upstream = upstream
        self.kind: MetricsKind = kind
        self.interval = interval
        self.timeout = timeout
        self.replicas = replicas
        self._failing: set[int] = set()  # indices of the replicas warned about
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Poll in a task of the running loop, a first round at once (no-op when
        already started)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"load-poller:{self.upstream}"
            )

    async def stop(self) -> None:
        """Cancel the task and wait for it to end."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def poll_once(self) -> None:
        """One round: every replica with a pool, concurrently."""
        polls = [self._poll(r) for r in self.replicas if r.pool is not None]
        if polls:
            await asyncio.gather(*polls)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.poll_once()
            except Exception:  # never let the poller die: the next round tries again
                log.exception("load poll round failed", extra={"upstream": self.upstream})
            await asyncio.sleep(max(self.interval - (loop.time() - started), 0.0))

    async def _poll(self, replica: Polled) -> None:
        try:
            load = await self._read(replica)
        except _Unreadable as exc:
            self._failed(replica, str(exc))
        except Exception as exc:  # whatever goes wrong, the replica keeps serving
            self._failed(replica, f"unexpected {type(exc).__name__}")
        else:
            replica.engine = load
            if replica.index in self._failing:
                self._failing.discard(replica.index)
                log.info(
                    "replica load metrics back",
                    extra={"upstream": self.upstream, "replica": replica.index},
                )

    def _failed(self, replica: Polled, reason: str) -> None:
        replica.engine = None
        if replica.index not in self._failing:
            self._failing.add(replica.index)
            log.warning(
                "replica load metrics unreadable, counting in-flight requests instead: %s",
                reason,
                extra={"upstream": self.upstream, "replica": replica.index},
            )

    async def _read(self, replica: Polled) -> EngineLoad:
        pool = replica.pool
        assert pool is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                resp = await pool.request(
                    "GET", replica.metrics_target, list(_HEADERS), None, timeout=self.timeout
                )
                try:
                    if resp.status != 200:
                        raise _Unreadable(f"status {resp.status}")
                    encoding = resp.headers.get("content-encoding", "").strip().lower()
                    if encoding not in ("", "identity"):
                        raise _Unreadable(f"the answer is encoded ({encoding[:40]})")
                    body = await resp.read(max(deadline - loop.time(), 0.001), MAX_BODY)
                finally:
                    resp.release()  # closes the connection unless the body was read whole
        except TimeoutError:
            raise _Unreadable(f"no answer within {self.timeout:g} s") from None
        except BodyTooLarge:
            raise _Unreadable(f"the answer is over {MAX_BODY} bytes") from None
        except OSError as exc:
            # its text names the address: only the kind of failure is logged
            raise _Unreadable(f"cannot connect ({type(exc).__name__})") from None
        except ClientError as exc:
            raise _Unreadable(f"the exchange failed ({type(exc).__name__})") from None
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _Unreadable("the answer is not UTF-8 text") from None
        try:
            return parse_metrics(self.kind, text)
        except ValueError as exc:
            raise _Unreadable(str(exc)) from None
