"""Running the application: one process, or several workers on one port."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket

from aiohttp import web

from proxy.app import STATE, build_app
from proxy.config import LoadedConfig

log = logging.getLogger("chat_proxy")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _run(config: LoadedConfig, host: str, port: int, reuse_port: bool) -> None:
    app = build_app(config)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024)
    await site.start()
    if not _is_loopback(host) and not any(e.type == "auth" for e in config.chain):
        log.warning(
            "listening beyond loopback with no auth middleware: anyone who can reach %s:%s may call the backend",
            host,
            port,
        )
    log.info(
        "chat-proxy listening",
        extra={"host": host, "port": port, "chain": [e.type for e in config.chain]},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    state = app[STATE]
    state.draining = True
    deadline = loop.time() + config.server.drain_seconds
    while state.in_flight and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    await runner.cleanup()


def serve(
    config: LoadedConfig, *, host: str, port: int, workers: int = 1, config_path: str | None = None
) -> int:
    if workers < 1:
        log.error("--workers must be at least 1")
        return 2
    asyncio.run(_run(config, host, port, reuse_port=workers > 1))
    return 0


_ = socket
