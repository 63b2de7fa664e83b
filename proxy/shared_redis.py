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

`send` is the request path's round trip on one server or a Sentinel-managed master:
its commands packed in one piece by hiredis (C) and written on one connection of the
pool, the replies read in order. redis-py's own pipelines pack each argument in
Python, growing the buffer argument by argument, and take a third of the proxy's
time per request with the full chain on Redis (py-spy, bench/stores.py's load); a
cluster keeps them, since they route each command to its node.
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import hiredis
from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

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


# the connections the lanes keep between their round trips, by pool: taken from the
# pool once and given back only when broken (redis-py 8's pool takes and releases a
# connection through several awaits, a lock and its own metrics each time)
KEPT_MAX = 64  # more are given back to the pool


class _Lane:
    """The sends of one pool: those made in one turn of the event loop go out
    together, in one write on one connection, and each gets its own replies."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.pending: list[tuple[bytes, int, asyncio.Future[list[Any]]]] = []
        self.kept: list[Any] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def add(self, payload: bytes, count: int) -> asyncio.Future[list[Any]]:
        future: asyncio.Future[list[Any]] = self.loop.create_future()
        if not self.pending:
            self.loop.call_soon(self._flush)
        self.pending.append((payload, count, future))
        return future

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        task = self.loop.create_task(self._run(batch), name="redis-lane")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, batch: list[tuple[bytes, int, asyncio.Future[list[Any]]]]) -> None:
        for attempt in (0, 1):
            conn = None
            try:
                conn = self.kept.pop() if self.kept else await self.pool.get_connection()
                await conn.send_packed_command(b"".join([b[0] for b in batch]), check_health=False)
                # one deadline for the write's replies, not one for each (math.inf:
                # redis-py's read sets none of its own)
                answered = 0
                try:
                    async with asyncio.timeout(conn.socket_timeout or SOCKET_TIMEOUT):
                        for _, count, future in batch:
                            replies: list[Any] = []
                            for _ in range(count):
                                try:
                                    replies.append(await conn.read_response(timeout=math.inf))
                                except ResponseError as exc:
                                    replies.append(exc)
                            answered += 1
                            if not future.done():  # a caller that gave up is not answered
                                future.set_result(replies)
                finally:
                    del batch[:answered]  # what is left was not answered
            except RedisConnectionError as exc:
                # a restart or a failover: the other kept connections are as stale;
                # the sends not answered go once more on a new connection
                if conn is not None:
                    await self._give_back(conn)
                while self.kept:
                    await self._give_back(self.kept.pop())
                if attempt:
                    self._fail(batch, exc)
                    return
                continue
            except BaseException as exc:
                if conn is not None:
                    await self._give_back(conn)
                if type(exc) is TimeoutError:
                    exc = RedisTimeoutError("no reply from Redis in time")
                self._fail(batch, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            if len(self.kept) < KEPT_MAX:
                self.kept.append(conn)
            else:
                await self.pool.release(conn)
            return

    @staticmethod
    def _fail(
        batch: list[tuple[bytes, int, asyncio.Future[list[Any]]]], exc: BaseException
    ) -> None:
        for _, _, future in batch:
            if not future.done():
                future.set_exception(
                    exc if isinstance(exc, Exception) else RedisConnectionError("cancelled")
                )

    async def _give_back(self, conn: Any) -> None:
        """A connection whose replies may not all have been read: closed, and given
        back to the pool (which reconnects it when next used)."""
        await conn.disconnect(nowait=True)
        await self.pool.release(conn)


_lanes: weakref.WeakKeyDictionary[Any, _Lane] = weakref.WeakKeyDictionary()


def _expire(future: asyncio.Future[list[Any]]) -> None:
    if not future.done():
        future.set_exception(RedisTimeoutError("no reply from Redis in time"))


async def send(
    client: Redis, commands: Sequence[tuple[Any, ...]], timeout: float | None = None
) -> list[Any]:
    """`commands` in one round trip (not a transaction) on a connection of `client`'s
    pool, together with the other sends of the same turn of the event loop; their
    replies in order, a `ResponseError` (such as NoScriptError) in the place of a
    command that failed. After a connection error the sends not yet answered are
    sent once more, on a new connection. The connection is read to the last reply
    of the write even when a caller gives up (its replies are dropped), or closed,
    so that no reply ever answers another command. With `timeout`, a reply not in
    within that many seconds raises redis-py's TimeoutError (a loop timer, not an
    `asyncio.timeout` context: the request path's Redis calls each have one)."""
    payload = b"".join([hiredis.pack_command(command) for command in commands])
    # redis-py's get_connection is wrapped by a deprecation decorator that hides its type
    pool: Any = client.connection_pool
    lane = _lanes.get(pool)
    if lane is None or lane.loop is not asyncio.get_running_loop():
        lane = _lanes[pool] = _Lane(pool)
    future = lane.add(payload, len(commands))
    if timeout is None:
        return await future
    timer = lane.loop.call_later(timeout, _expire, future)
    try:
        return await future
    finally:
        timer.cancel()


async def send_scripts(
    client: Redis,
    commands: Sequence[tuple[Any, ...]],
    scripts: Mapping[str, Any],
    timeout: float | None = None,
) -> list[Any]:
    """`send`, for commands that include EVALSHA: a server that does not know a script
    (started, restarted, flushed, promoted) answers NOSCRIPT; the scripts those
    commands name are then loaded (`scripts`: each one's text by its SHA-1) and those
    commands alone sent again, this once, so that a script that ran is never run
    twice. With `timeout`, the whole call is bounded by it."""
    started = time.monotonic()
    replies = await send(client, commands, timeout)
    missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
    if not missing:
        return replies
    left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
    async with asyncio.timeout(left):
        for sha in dict.fromkeys(str(commands[i][1]) for i in missing):
            await client.script_load(scripts[sha])
        again = await send(client, [commands[i] for i in missing])
    for i, reply in zip(missing, again, strict=True):
        replies[i] = reply
    return replies
