"""Upstreams: which backend serves a model, its replicas, their connection pools and
their health.

Routing is by model glob, first match first; upstreams with a `weight` are balanced.
Within an upstream, a request picks one of its replicas (`balance`: affinity by
consistent hashing with bounded load, least_busy or round_robin; proxy/fleet/).
Passive health, per replica: a replica that fails `circuit.failures` times in a row
is skipped for `circuit.cooldown` seconds, then tried again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import ssl
import time
from collections.abc import Collection, Iterable
from fnmatch import fnmatchcase

from yarl import URL

from proxy import metrics
from proxy.backend import BackendClient, request_target
from proxy.backend.aiohttp_client import AiohttpClient
from proxy.backend.http1 import Pool
from proxy.config import QueueConfig, UpstreamConfig, UpstreamTls
from proxy.fleet.admission import Admission
from proxy.fleet.load import EngineLoad, LoadPoller
from proxy.fleet.ring import Ring

log = logging.getLogger("chat_proxy.upstream")


class Replica:
    """One server of an upstream: its connection pool, its passive health and its
    load. Known outside by its index, never by its address."""

    def __init__(self, cfg: UpstreamConfig, index: int, url: str) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.index = index
        self.label = str(index)
        self.url = url
        self.base = URL(url) if not url.startswith("echo:") else URL("http://127.0.0.1")
        self.pool: BackendClient | None = None
        self.failures = 0
        self.open_until = 0.0
        self._probed_at = -10.0
        self._targets: dict[str, str] = {}
        self._reachable = True
        self.auth = [("Authorization", f"Bearer {cfg.api_key}")] if cfg.api_key else []
        # requests this proxy has in flight on it, from admission to the answer's end
        self.in_flight = 0
        # what the engine's own metrics said last (load.metrics), None when unread
        self._engine: EngineLoad | None = None
        self.metrics_target = "/metrics"

    @property
    def is_open(self) -> bool:
        return self.open_until > time.monotonic()

    @property
    def engine(self) -> EngineLoad | None:
        return self._engine

    @engine.setter
    def engine(self, value: EngineLoad | None) -> None:
        self._engine = value
        running = value.running if value is not None else 0.0
        waiting = value.waiting if value is not None else 0.0
        metrics.REPLICA_ENGINE.labels(self.name, self.label, "running").set(running)
        metrics.REPLICA_ENGINE.labels(self.name, self.label, "waiting").set(waiting)

    @property
    def load(self) -> float:
        """Requests in flight here: this proxy's count, or the engine's own (running
        and waiting, from every client) when it says more."""
        engine = self.engine
        if engine is None:
            return float(self.in_flight)
        return max(float(self.in_flight), engine.requests)

    def state(self) -> str:
        if self.pool is None:
            return "stopped"
        if self.is_open:
            return "open"
        return "degraded" if self.failures else "ok"

    async def probe(self, timeout: float = 1.0) -> str:
        """The state, with an active check that the backend accepts connections (a
        model server binds its port once the model is loaded); cached briefly."""
        state = self.state()
        if state in ("stopped", "open"):
            return state
        now = time.monotonic()
        if now - self._probed_at > 2.0:
            host = self.base.host or "127.0.0.1"
            port = self.base.port or (443 if self.base.scheme == "https" else 80)
            try:
                async with asyncio.timeout(min(timeout, self.cfg.timeouts.connect)):
                    _, writer = await asyncio.open_connection(host, port)
                writer.close()
                self._reachable = True
            except (OSError, TimeoutError):
                self._reachable = False
            self._probed_at = now
        return state if self._reachable else "unreachable"

    def record(self, ok: bool) -> None:
        if ok:
            self.failures = 0
            self.open_until = 0.0
            return
        self.failures += 1
        if self.failures >= self.cfg.circuit.failures:
            self.open_until = time.monotonic() + self.cfg.circuit.cooldown
            log.warning(
                "upstream circuit open",
                extra={
                    "upstream": self.name,
                    "replica": self.index,
                    "failures": self.failures,
                    "cooldown": self.cfg.circuit.cooldown,
                },
            )

    def target(self, path: str, raw_query: str) -> str:
        """The request-target on this backend for a path after /v1 (or the bare path
        for /chat/completions) and the client's query string."""
        if not raw_query:
            cached = self._targets.get(path)
            if cached is None:
                cached = request_target(self._base_path, path, "")
                if len(self._targets) < 1024:
                    self._targets[path] = cached
            return cached
        return request_target(self._base_path, path, raw_query)

    @property
    def _base_path(self) -> str:
        return self.base.raw_path.rstrip("/")

    async def start(self) -> None:
        if self.url.startswith("echo:"):
            from proxy.echo import start_echo

            self.base = await start_echo(self.url)
        scheme, host, port = self.base.scheme, self.base.raw_host or "127.0.0.1", self.base.port
        ssl_context = tls_context(self.cfg.tls) if scheme == "https" else None
        client = AiohttpClient if self.cfg.client == "aiohttp" else Pool
        self.pool = client(
            scheme,
            host,
            port,
            limit=self.cfg.max_connections,
            connect_timeout=self.cfg.timeouts.connect,
            pool_timeout=self.cfg.timeouts.pool,
            idle_seconds=self.cfg.idle_seconds,
            ssl_context=ssl_context,
        )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
        if self.url.startswith("echo:"):
            from proxy.echo import stop_echo

            await stop_echo(self.base)


class Upstream:
    """One configured backend: the models it serves and its replicas (one for an
    upstream with `url`), and the choice among them."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.replicas = [Replica(cfg, i, url) for i, url in enumerate(cfg.urls)]
        self.fleet = len(self.replicas) > 1
        self.max_in_flight = cfg.max_in_flight
        # one replica, no admission: nothing to choose, nothing to wait for
        self.plain = not self.fleet and cfg.max_in_flight is None
        self.balance = cfg.balance
        self._ring = Ring(cfg.urls) if self.fleet and cfg.balance == "affinity" else None
        self._turn = itertools.count()
        self._poller: LoadPoller | None = None

    def serves(self, model: str | None) -> bool:
        name = model or ""
        return any(fnmatchcase(name, pattern) for pattern in self.cfg.models)

    @property
    def is_open(self) -> bool:
        """Every replica's circuit is open."""
        if not self.fleet:
            return self.replicas[0].open_until > time.monotonic()
        return all(r.is_open for r in self.replicas)

    def usable(self, r: Replica) -> bool:
        cap = self.max_in_flight
        return not r.is_open and (cap is None or r.in_flight < cap)

    @property
    def full(self) -> bool:
        """No replica can take a request now (each open or at max_in_flight)."""
        return not any(self.usable(r) for r in self.replicas)

    def choose(self, point: int | None, avoid: Collection[Replica] = ()) -> Replica | None:
        """The replica for a request whose affinity key hashes to `point` (None: no
        key), not one of `avoid` where another can serve; None when none can take it
        now."""
        replicas = self.replicas
        if not self.fleet:
            r = replicas[0]
            return r if self.usable(r) else None
        usable = [self.usable(r) for r in replicas]
        if not any(usable):
            return None
        if avoid:
            others = [ok and r not in avoid for r, ok in zip(replicas, usable, strict=True)]
            if any(others):
                usable = others
        if self._ring is not None and point is not None:
            loads = [r.load for r in replicas]
            picked = self._ring.pick(point, loads, usable, self.cfg.affinity.load_factor)
            assert picked is not None
            chosen, owner = picked
            if chosen != owner:
                metrics.AFFINITY_SPILLS.labels(self.name, replicas[owner].label).inc()
            return replicas[chosen]
        if self.balance == "round_robin":
            n = len(replicas)
            start = next(self._turn)
            for step in range(n):
                i = (start + step) % n
                if usable[i]:
                    return replicas[i]
        least = min(r.load for r, ok in zip(replicas, usable, strict=True) if ok)
        ties = [r for r, ok in zip(replicas, usable, strict=True) if ok and r.load == least]
        return ties[0] if len(ties) == 1 else random.choice(ties)

    def state(self) -> str:
        """The best of its replicas' states."""
        states = [r.state() for r in self.replicas]
        for state in ("ok", "degraded", "unreachable", "open"):
            if state in states:
                return state
        return states[0]

    async def probe(self) -> str:
        states = await asyncio.gather(*(r.probe() for r in self.replicas))
        for state in ("ok", "degraded", "unreachable", "open"):
            if state in states:
                return state
        return states[0]

    async def start(self) -> None:
        for r in self.replicas:
            await r.start()
        kind = self.cfg.load.metrics
        if kind != "none":
            self._poller = LoadPoller(self.name, kind, self.cfg.load.interval, self.replicas)
            self._poller.start()

    async def close(self) -> None:
        if self._poller is not None:
            await self._poller.stop()
            self._poller = None
        for r in self.replicas:
            await r.close()


def tls_context(tls: UpstreamTls) -> ssl.SSLContext:
    """The TLS context of an https:// upstream: the system's CAs or `ca_file`'s, the
    client certificate and key when given, no verification when `verify` is false."""
    ctx = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file is not None:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Upstreams:
    def __init__(self, configs: Iterable[UpstreamConfig], queue: QueueConfig | None = None) -> None:
        self.all = [Upstream(c) for c in configs]
        # any fleet that balances by affinity: requests need their affinity key
        self.affinity = any(u.fleet and u.balance == "affinity" for u in self.all)
        self.admission: Admission[Upstream, Replica] = Admission(queue or QueueConfig())
        self._matches: dict[str, list[Upstream]] = {}
        self.keepalive = 0.0
        self.max_response_bytes = 64 * 1024 * 1024

    async def start(self) -> None:
        for up in self.all:
            await up.start()

    async def close(self) -> None:
        for up in self.all:
            await up.close()

    def candidates(self, model: str | None) -> list[Upstream]:
        """Upstreams serving `model` in the order to try them: config order, except
        that upstreams with a `weight` matching alongside the first are balanced."""
        key = model or ""
        matching = self._matches.get(key)
        if matching is None:
            matching = [u for u in self.all if u.serves(model)]
            if len(self._matches) < 4096:  # bounded: clients may send any name
                self._matches[key] = matching
        if len(matching) > 1 and matching[0].cfg.weight != 1:
            weighted = [u for u in matching if u.cfg.weight != 1]
            rest = [u for u in matching if u.cfg.weight == 1]
            order: list[Upstream] = []
            pool = list(weighted)
            while pool:
                pick = random.choices(pool, weights=[u.cfg.weight for u in pool])[0]
                order.append(pick)
                pool.remove(pick)
            matching = order + rest
        return matching

    def states(self) -> dict[str, str]:
        return {u.name: u.state() for u in self.all}

    async def probe(self) -> dict[str, str]:
        states = await asyncio.gather(*(u.probe() for u in self.all))
        return {u.name: state for u, state in zip(self.all, states, strict=True)}

    async def replica_states(self) -> dict[str, list[dict[str, object]]]:
        """Each fleet's replicas by index (never by address): state, requests in
        flight, and the engine's own load where it is polled."""
        out: dict[str, list[dict[str, object]]] = {}
        for up in self.all:
            if not up.fleet:
                continue
            rows: list[dict[str, object]] = []
            states = await asyncio.gather(*(r.probe() for r in up.replicas))
            for r, state in zip(up.replicas, states, strict=True):
                row: dict[str, object] = {
                    "index": r.index,
                    "state": state,
                    "in_flight": r.in_flight,
                }
                if r.engine is not None:
                    row["engine"] = {
                        "running": r.engine.running,
                        "waiting": r.engine.waiting,
                        "kv_usage": r.engine.kv_usage,
                    }
                rows.append(row)
            out[up.name] = rows
        return out
