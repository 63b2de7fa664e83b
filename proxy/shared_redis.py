"""The one Redis connection of a proxy process whose store is Redis: opened once by
the application and shared by the session store and the rate-limit counters (each
builds its client on it with `client_for`; neither closes it).

Its shape follows `store`:

- one server (`url`): a ConnectionPool;
- Redis Sentinel (`sentinel`): a SentinelConnectionPool. Each new connection asks
  the sentinels for the master's address, and the pool drops its idle connections
  when that address changes (a failover). A connection still open to a master that
  was demoted answers READONLY; redis-py closes it and reports a connection error,
  so the next attempt connects to the new master;
- Redis Cluster (`cluster: true`, `url` names one node): a RedisCluster client, which
  learns the cluster's slots from that node, keeps a pool per node and sends each
  command to the node that holds its keys' hash slot (following MOVED and ASK).

These are redis-py's own clients rather than hand-written discovery: the Sentinel
protocol (which sentinel to believe, a master marked down) and the cluster's slot map
and redirections are subtle to get right, and redis-py is the client the proxy
already uses.

Every connection error is retried once at once (a pooled connection left broken by a
restart or a failover reconnects, to the new master where there is one); nothing
waits longer. The callers bound their own waits (the limiter 1 s, a session lookup
2 s).
"""

from __future__ import annotations

from typing import Any, TypeAlias

from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.config import StoreConfig

# ConnectionPool for one server or a Sentinel-managed master; the client itself for a
# cluster (its pools are per node)
SharedRedis: TypeAlias = ConnectionPool | RedisCluster

CONNECT_TIMEOUT = 5.0  # seconds to open a connection
SOCKET_TIMEOUT = 10.0  # seconds for a reply
SENTINEL_TIMEOUT = 0.5  # seconds for a sentinel's answer (another sentinel is asked next)
# connections per server (per node of a cluster) and process: beyond this a command
# fails at once (redis-py's default, 100, is less than the requests one process serves
# at a time; each holds a connection for one command)
MAX_CONNECTIONS = 10_000


def _retry() -> Retry:
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def open_pool(cfg: StoreConfig) -> SharedRedis:
    """The connections for `store`; nothing connects until a first command. Replies
    are decoded (the session store reads text; the limiter's scripts answer
    integers)."""
    if cfg.cluster:
        cluster: RedisCluster = RedisCluster.from_url(
            cfg.url,
            decode_responses=True,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=SOCKET_TIMEOUT,
            max_connections=MAX_CONNECTIONS,
            # a node failing over answers CLUSTERDOWN or moves its slots: a few
            # short waits, well under a second in all
            retry=Retry(ExponentialBackoff(cap=0.25, base=0.025), 3),
        )
        return cluster
    if cfg.sentinel is not None:
        return _sentinel_pool(cfg)
    pool: ConnectionPool = ConnectionPool.from_url(
        cfg.url,
        decode_responses=True,
        max_connections=MAX_CONNECTIONS,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=SOCKET_TIMEOUT,
        retry=_retry(),
    )
    return pool


def _sentinel_pool(cfg: StoreConfig) -> SentinelConnectionPool:
    assert cfg.sentinel is not None
    # the master's credentials, database and TLS from the url; its address from the
    # sentinels
    options: dict[str, Any] = dict(parse_url(cfg.url))
    options.pop("host", None)
    options.pop("port", None)
    options.pop("path", None)
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    sentinel_options: dict[str, Any] = {
        "socket_connect_timeout": SENTINEL_TIMEOUT,
        "socket_timeout": SENTINEL_TIMEOUT,
        # every new connection to the master asks a sentinel first
        "max_connections": MAX_CONNECTIONS,
    }
    if cfg.sentinel.username:
        sentinel_options["username"] = cfg.sentinel.username
    if cfg.sentinel.password:
        sentinel_options["password"] = cfg.sentinel.password
    manager = Sentinel(  # type: ignore[no-untyped-call]
        cfg.sentinel.addresses(), sentinel_kwargs=sentinel_options
    )
    # the url's own options (?socket_timeout=...) win, as with one server
    master: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": SOCKET_TIMEOUT,
        "max_connections": MAX_CONNECTIONS,
        "retry": _retry(),
        **options,
    }
    return SentinelConnectionPool(  # type: ignore[no-untyped-call]
        cfg.sentinel.service, manager, **master
    )


def client_for(shared: SharedRedis) -> Redis | RedisCluster:
    """A client on the shared connections. Closing it closes nothing shared, except
    for a cluster, whose one client is the shared object: its users never close it
    (`close_pool` does)."""
    if isinstance(shared, RedisCluster):
        return shared
    return Redis(connection_pool=shared)


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster)


async def close_pool(shared: SharedRedis) -> None:
    """Close what `open_pool` opened (the sentinels' connections too)."""
    if isinstance(shared, RedisCluster):
        await shared.aclose()
        return
    await shared.disconnect()
    if isinstance(shared, SentinelConnectionPool):
        await shared.sentinel_manager.aclose()
