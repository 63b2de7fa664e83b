"""Running the application: signals, reload, graceful shutdown, workers.

- SIGHUP re-reads the configuration (and keys files): a bad file keeps the old chain
  and logs why; requests in flight finish on the chain they started with.
- SIGTERM/SIGINT: stop accepting, /readyz answers 503, streams in flight get up to
  `server.drain_seconds` to finish, pending session writes are flushed, exit 0.
- Client connections are bounded by `server.timeouts` (proxy/inbound.py): a slow
  request head or body gets a 408, an idle connection is closed, a client that takes
  nothing of its answer is dropped.
- `--workers N`: N processes bind the same port with SO_REUSEPORT; the parent
  forwards signals and waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable

from aiohttp import web

from proxy import capacity, gcwatch
from proxy.app import (
    STATE,
    Runtime,
    State,
    build_app,
    build_runtime,
    start_runtime,
    stop_runtime,
)
from proxy.chain import order_warnings
from proxy.config import WORKERS_ENV, ConfigError, LoadedConfig
from proxy.inbound import LimitedRunner
from proxy.loader import load

log = logging.getLogger("chat_proxy")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def reload(app: web.Application, path: str | None) -> bool:
    """Swap in the chain of a re-read configuration; keep the old one on error."""
    state = app[STATE]
    old = state.runtime
    try:
        config = load(path)
        new = await build_runtime(config, old.ctx.store, previous=old, redis=old.ctx.redis)
        await start_runtime(new)
    except ConfigError as exc:
        log.error("reload failed: keeping the running configuration", extra={"errors": exc.errors})
        return False
    except Exception as exc:
        log.error("reload failed: keeping the running configuration", extra={"errors": [repr(exc)]})
        return False
    if config.store != old.config.store or config.server != old.config.server:
        log.warning("reload: server and store settings take effect at the next restart")
    state.runtime = new
    log.info("configuration reloaded", extra={"chain": new.middleware_names})
    state.retiring.add(old)
    asyncio.get_running_loop().create_task(_retire(state, old, config.server.drain_seconds))
    return True


async def _retire(state: State, rt: Runtime, drain: float) -> None:
    """Stop a replaced runtime once the requests that started on it are done."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(drain, 1.0)
    while rt.in_flight and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    state.retiring.discard(rt)
    await stop_runtime(rt)


async def _run(
    config: LoadedConfig, host: str, port: int, reuse_port: bool, path: str | None
) -> None:
    files = capacity.raise_file_limit()
    connections = capacity.client_connections(config, files)
    gcwatch.install()
    app = build_app(config)
    # client connections bounded by server.timeouts and in number; handlers cancelled
    # when clients go
    runner = LimitedRunner(
        app,
        config.server.timeouts,
        max_connections=connections,
        access_log=None,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024)
    await site.start()
    gcwatch.freeze()
    workers = int(os.environ.get(WORKERS_ENV, "1") or 1)
    if not _is_loopback(host) and not any(e.type == "auth" for e in config.chain):
        log.warning(
            "listening beyond loopback with no auth middleware: anyone who can reach "
            "this address may call the backend",
            extra={"host": host, "port": port},
        )
    log.info(
        "chat-proxy listening",
        extra={
            "host": host,
            "port": port,
            "pid": os.getpid(),
            "workers": workers,
            "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            "chain": [e.type for e in config.chain],
            "open_files": files,
            # client connections taken at once (each stream holds one, and one to
            # its backend within the upstreams' max_connections)
            "max_connections": connections,
            "backend_connections": capacity.backend_connections(config),
        },
    )
    for line in order_warnings(config.chain):
        log.warning("chain order: %s", line)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload(app, path)))
    await stop.wait()
    state = app[STATE]
    state.draining = True
    log.info(
        "draining",
        extra={"in_flight": state.in_flight, "drain_seconds": config.server.drain_seconds},
    )
    await site.stop()  # stop accepting new connections
    deadline = loop.time() + config.server.drain_seconds
    while state.in_flight and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    if state.in_flight:
        log.warning(
            "drain time over: closing streams still in flight", extra={"in_flight": state.in_flight}
        )
    await runner.cleanup()
    log.info("stopped")
    for handler in logging.getLogger().handlers:
        handler.flush()


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop `server.event_loop` asks for: uvloop (libuv) where it is
    installed unless `asyncio` is chosen; None is the standard library's loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


def serve(
    config: LoadedConfig, *, host: str, port: int, workers: int = 1, config_path: str | None = None
) -> int:
    if workers < 1:
        log.error("--workers must be at least 1")
        return 2
    if workers == 1 or os.environ.get(WORKERS_ENV):
        reuse_port = bool(os.environ.get(WORKERS_ENV))
        with asyncio.Runner(loop_factory=loop_factory(config.server.event_loop)) as runner:
            runner.run(_run(config, host, port, reuse_port=reuse_port, path=config_path))
        return 0
    return _supervise(config, host, port, workers, config_path)


def _supervise(config: LoadedConfig, host: str, port: int, workers: int, path: str | None) -> int:
    """Start N workers on one port and relay signals to them."""
    env = dict(os.environ)
    env[WORKERS_ENV] = str(workers)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        tmp = tempfile.TemporaryDirectory(prefix="chat-proxy-metrics-")
        env["PROMETHEUS_MULTIPROC_DIR"] = tmp.name
    args = [sys.executable, "-m", "proxy", "serve", "--host", host, "--port", str(port)]
    if path:
        args += ["--config", path]
    procs = [subprocess.Popen(args, env=env) for _ in range(workers)]
    log.info("started workers", extra={"workers": workers, "pids": [p.pid for p in procs]})

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    codes = [p.wait() for p in procs]
    if tmp is not None:
        tmp.cleanup()
    return 0 if all(c == 0 for c in codes) else 1
