"""How many client connections one process takes: its open-file limit, shared out.

Every client connection holds a descriptor, and so does every connection to a
backend (at most the upstreams' `max_connections`, each replica a pool of its own);
the store, the logs and the listening sockets hold a few more. A process that runs
out of descriptors cannot accept(): the event loop closes the connection it could
not take, and the client gets nothing at all. So the proxy keeps the count below
the limit itself: at start it raises its soft limit to the hard one, and takes at
most `server.max_connections` client connections (by default what the limit leaves
once the pools and a margin are counted); one more is answered with a 503
`too_many_connections` and closed (proxy/inbound.py), counted in
`chat_proxy_connections_refused_total{reason="max_connections"}` and logged at
most once a minute.
"""

from __future__ import annotations

import logging
import resource

from proxy.config import LoadedConfig

log = logging.getLogger("chat_proxy")

# descriptors kept for what is not a connection: the store, logs, the listening
# sockets, the metrics files of several workers, a resolver
MARGIN = 64
# never fewer client connections than this, whatever the limit says
MINIMUM = 16


def raise_file_limit() -> int:
    """The soft limit on open files raised to the hard one; the limit now."""
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


def backend_connections(config: LoadedConfig) -> int:
    """The most connections the upstreams' pools may hold at once."""
    return sum(up.max_connections * len(up.urls) for up in config.upstreams)


def client_connections(config: LoadedConfig, files: int) -> int:
    """The client connections this process takes: `server.max_connections`, or what
    `files` descriptors leave once the backend pools and the margin are counted."""
    if config.server.max_connections is not None:
        return config.server.max_connections
    return max(MINIMUM, files - MARGIN - backend_connections(config))
