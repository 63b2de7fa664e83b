"""Upstreams: which backend serves a model, its connection pool and its health.

Routing is by model glob, first match first; upstreams with a `weight` are balanced.
Passive health: an upstream that fails `circuit.failures` times in a row is skipped
for `circuit.cooldown` seconds, then tried again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Iterable
from fnmatch import fnmatchcase

from yarl import URL

from proxy.backend import BackendClient, request_target
from proxy.backend.aiohttp_client import AiohttpClient
from proxy.backend.http1 import Pool
from proxy.config import UpstreamConfig, UpstreamTls

log = logging.getLogger("chat_proxy.upstream")


class Upstream:
    """One configured backend: its connection pool and its passive health."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.base = URL(cfg.url) if not cfg.url.startswith("echo:") else URL("http://127.0.0.1")
        self.pool: BackendClient | None = None
        self.failures = 0
        self.open_until = 0.0
        self._probed_at = -10.0
        self._targets: dict[str, str] = {}
        self._reachable = True
        self.auth = [("Authorization", f"Bearer {cfg.api_key}")] if cfg.api_key else []

    def serves(self, model: str | None) -> bool:
        name = model or ""
        return any(fnmatchcase(name, pattern) for pattern in self.cfg.models)

    @property
    def is_open(self) -> bool:
        return self.open_until > time.monotonic()

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
        if self.cfg.url.startswith("echo:"):
            from proxy.echo import start_echo

            self.base = await start_echo(self.cfg.url)
        scheme, host, port = self.base.scheme, self.base.raw_host or "127.0.0.1", self.base.port
        ssl_context = tls_context(self.cfg.tls) if scheme == "https" else None
        client = AiohttpClient if self.cfg.client == "aiohttp" else Pool
        self.pool = client(
            scheme,
            host,
            port,
            limit=self.cfg.max_connections,
            connect_timeout=self.cfg.timeouts.connect,
            idle_seconds=self.cfg.idle_seconds,
            ssl_context=ssl_context,
        )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
        if self.cfg.url.startswith("echo:"):
            from proxy.echo import stop_echo

            await stop_echo(self.base)


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
    def __init__(self, configs: Iterable[UpstreamConfig]) -> None:
        self.all = [Upstream(c) for c in configs]
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
