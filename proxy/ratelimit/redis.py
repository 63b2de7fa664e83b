"""The Redis limiter: one atomic Lua script per check, shared by every worker and
replica.

The script reads the clock of the Redis server (`TIME`), so the clocks of the
replicas do not matter, and checks the request bucket, the token bucket and the
in-flight set of a key together: either every limit passes and all are counted, or
nothing is. In-flight requests are members of a sorted set scored by a lease expiry,
renewed while they run, so a replica that dies does not hold its slots forever.

Redis failures (unreachable, slow, restarted, failing over) raise StoreError fast: a
check waits a second at most, and after a failure the limiter does not try again for
a second, so a dead Redis does not stall requests.

The three keys of a client carry a hash tag (`P rl:{KEY}:req`, `:tok`, `:conc`), so
on a Redis Cluster they share a slot and one script reaches all of them; through
Sentinel the counters are on the master the sentinels name (proxy/shared_redis.py).
On one server or through Sentinel the scripts go out by `shared_redis.send` (packed
in C, one write); on a cluster through redis-py, which routes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable
from typing import Any, TypeAlias, TypeVar

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError

from proxy.config import StoreConfig
from proxy.ratelimit import StoreError
from proxy.ratelimit.algorithm import PERIOD, Decision, Quota, Window
from proxy.shared_redis import (
    MAX_CONNECTIONS,
    SharedRedis,
    client_for,
    close_pool,
    open_pool,
    send_scripts,
)

log = logging.getLogger("chat_proxy.rate_limit")

T = TypeVar("T")

# KEYS: request TAT, token TAT, in-flight set
# ARGV: requests/min, tokens/min, max concurrent (0: none), token cost, lease member,
#       lease ms, period ms
# returns {allowed, concurrent ok, requests ok, tokens ok, requests remaining,
#          requests reset ms, tokens remaining, tokens reset ms, retry ms, in flight}
CHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local maxc = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local lease = tonumber(ARGV[6])
local period = tonumber(ARGV[7])
local eps = 1e-6

local function gcra(key, limit, n)
  local interval = period / limit
  local v = redis.call('GET', key)
  local tat = v and tonumber(v) or 0
  local base = math.max(tat, now)
  local new = base + n * interval
  if new - now <= period + eps then
    return 1, new, math.max(0, math.floor((period - (new - now)) / interval + eps)), new - now, 0
  end
  return 0, tat, math.max(0, math.floor((period - (base - now)) / interval + eps)), base - now,
    new - now - period
end

local retry = 0
local c_ok, in_flight = 1, 0
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  in_flight = redis.call('ZCARD', KEYS[3])
  if in_flight >= maxc then
    c_ok = 0
    retry = 1000
  end
end
local r_ok, r_tat, r_rem, r_reset, r_retry = 1, 0, 0, 0, 0
if rpm > 0 then
  r_ok, r_tat, r_rem, r_reset, r_retry = gcra(KEYS[1], rpm, 1)
  retry = math.max(retry, r_retry)
end
local t_ok, t_tat, t_rem, t_reset, t_retry = 1, 0, 0, 0, 0
if tpm > 0 then
  t_ok, t_tat, t_rem, t_reset, t_retry = gcra(KEYS[2], tpm, cost)
  retry = math.max(retry, t_retry)
end
local allowed = c_ok * r_ok * t_ok
if allowed == 1 then
  if rpm > 0 then
    redis.call('SET', KEYS[1], string.format('%.3f', r_tat), 'PX', math.ceil(r_tat - now) + 1000)
  end
  if tpm > 0 then
    redis.call('SET', KEYS[2], string.format('%.3f', t_tat), 'PX', math.ceil(t_tat - now) + 1000)
  end
  if maxc > 0 then
    redis.call('ZADD', KEYS[3], now + lease, ARGV[5])
    redis.call('PEXPIRE', KEYS[3], lease * 2)
    in_flight = in_flight + 1
  end
end
return {allowed, c_ok, r_ok, t_ok, r_rem, math.ceil(r_reset), t_rem, math.ceil(t_reset),
  math.ceil(retry), in_flight}
"""

# KEYS: token TAT, in-flight set; ARGV: tokens/min (0: none), token delta, lease
# member ('' : none), period ms
SETTLE = """
if ARGV[3] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[3])
end
local tpm = tonumber(ARGV[1])
local delta = tonumber(ARGV[2])
if tpm > 0 and delta ~= 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  local v = redis.call('GET', KEYS[1])
  local tat = v and tonumber(v) or 0
  local new = math.max(math.max(tat, now) + delta * (tonumber(ARGV[4]) / tpm), now)
  if new > now then
    redis.call('SET', KEYS[1], string.format('%.3f', new), 'PX', math.ceil(new - now) + 1000)
  else
    redis.call('DEL', KEYS[1])
  end
end
return 1
"""

# KEYS: in-flight set; ARGV: lease ms, members still running
RENEW = """
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000 + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', until_ms, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return 1
"""

# a script, its keys and its arguments
Extra: TypeAlias = tuple[AsyncScript, list[str], list[str]]


class LookupFailed(Exception):
    """The script sent with a check failed (the check itself answered)."""


COOLDOWN = 1.0  # seconds without trying Redis after it failed
CALL_TIMEOUT = 1.0  # seconds: the most a check may wait for Redis


def connect(url: str, timeout: float = 0.5) -> Redis:
    """A client for the limiter: short timeouts, one immediate retry (a pooled
    connection may be stale after a Redis restart), no backoff."""
    client: Redis = Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=0,
        max_connections=MAX_CONNECTIONS,
    )
    return client


class RedisLimiter:
    scope = "shared"

    def __init__(
        self,
        client: Redis | RedisCluster,
        prefix: str,
        *,
        lease: float = 60.0,
        period: float = PERIOD,
        closes_client: bool = True,
        pool: SharedRedis | None = None,
    ) -> None:
        """`closes_client`: close `client` at close (not a cluster's shared client);
        `pool`: connections of its own, closed at close too."""
        self.client: Any = client
        self._closes_client = closes_client
        self._pool = pool
        self.prefix = prefix
        self.lease = lease
        self.period_ms = round(period * 1000)
        self.cluster = isinstance(client, RedisCluster)
        self._check = client.register_script(CHECK)
        self._settle = client.register_script(SETTLE)
        self._renew = client.register_script(RENEW)
        self._down_until = 0.0
        self._held: dict[str, set[str]] = {}  # in-flight set key -> lease members
        self._renewer: asyncio.Task[None] | None = None

    def _keys(self, key: str) -> list[str]:
        # a hash tag keeps the three keys of one client in one Redis Cluster slot
        base = f"{self.prefix}rl:{{{key}}}:"
        return [base + "req", base + "tok", base + "conc"]

    async def _call(self, work: Awaitable[T], timed: bool = True) -> T:
        """`work`'s answer, within CALL_TIMEOUT (`timed`: here; else `work` bounds
        itself, as `shared_redis.send` does); a failure is a StoreError."""
        if time.monotonic() < self._down_until:
            if asyncio.iscoroutine(work):
                work.close()
            raise StoreError("Redis was unreachable a moment ago")
        try:
            if not timed:
                return await work
            async with asyncio.timeout(CALL_TIMEOUT):
                return await work
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            self._down_until = time.monotonic() + COOLDOWN
            raise StoreError(f"{type(exc).__name__}: {exc}") from exc

    async def acquire(
        self, key: str, quota: Quota, cost: int, also: Extra | None = None
    ) -> Decision:
        """`also`: a read-only script (the session lookup) sent with the check, whose
        answer is the decision's `looked_up` (a `LookupFailed` when it alone failed)."""
        rpm = quota.requests_per_minute or 0
        tpm = quota.tokens_per_minute or 0
        maxc = quota.max_concurrent or 0
        member = uuid.uuid4().hex if maxc else ""
        keys = self._keys(key)
        args: list[int | str] = [
            rpm,
            tpm,
            maxc,
            cost,
            member,
            round(self.lease * 1000),
            self.period_ms,
        ]
        found: Any = None
        if also is None:
            raw: Any = await self._call(self._one(self._check, keys, args), self.cluster)
        else:
            raw, found = await self._call(self._check_and(keys, args, also), self.cluster)
        allowed, c_ok, r_ok, t_ok, r_rem, r_reset, t_rem, t_reset, retry, in_flight = (
            int(x) for x in raw
        )
        exceeded = tuple(
            name
            for name, ok in (("concurrent", c_ok), ("requests", r_ok), ("tokens", t_ok))
            if not ok
        )
        lease = None
        if allowed and maxc:
            lease = member
            self._held.setdefault(keys[2], set()).add(member)
            self._ensure_renewer()
        return Decision(
            allowed=bool(allowed),
            requests=Window(rpm, r_rem, r_reset / 1000) if rpm else None,
            tokens=Window(tpm, t_rem, t_reset / 1000) if tpm else None,
            exceeded=exceeded,
            retry_after=retry / 1000,
            lease=lease,
            in_flight=in_flight,
            looked_up=found,
        )

    async def _check_and(self, keys: list[str], args: list[int | str], also: Extra) -> Any:
        """The check and `also` in one round trip: one pipeline on one server or a
        Sentinel-managed master. On a cluster `also`'s keys (an owner's `{O}` slot)
        are not in the slot of the check's (`{KEY}`), so the two go to their nodes at
        once, two round trips side by side."""
        script, extra_keys, extra_args = also
        results: list[Any]
        if self.cluster:
            results = list(
                await asyncio.gather(
                    self._check(keys=keys, args=args),
                    script(keys=extra_keys, args=extra_args),
                    return_exceptions=True,
                )
            )
        else:
            results = await self._scripts(
                [(self._check, keys, args), (script, extra_keys, extra_args)]
            )
        raw, found = results
        if isinstance(raw, BaseException):
            raise raw
        if isinstance(found, BaseException):
            return raw, LookupFailed(f"{type(found).__name__}: {found}")
        return raw, found

    async def _scripts(self, calls: list[tuple[AsyncScript, list[str], list[Any]]]) -> list[Any]:
        """Scripts in one round trip (one server or a Sentinel-managed master), within
        CALL_TIMEOUT: their answers in order, an error in the place of a script that
        failed (`shared_redis.send_scripts`, which loads a script the server lacks)."""
        commands = [("EVALSHA", sc.sha, len(k), *k, *a) for sc, k, a in calls]
        texts = {sc.sha: sc.script for sc, _, _ in calls}
        return await send_scripts(self.client, commands, texts, CALL_TIMEOUT)

    async def _one(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """One script's answer; its error raised."""
        if self.cluster:
            return await script(keys=keys, args=args)
        (reply,) = await self._scripts([(script, keys, args)])
        if isinstance(reply, BaseException):
            raise reply
        return reply

    async def settle(self, key: str, quota: Quota, lease: str | None, token_delta: int) -> None:
        keys = self._keys(key)
        if lease is not None:
            members = self._held.get(keys[2])
            if members is not None:
                members.discard(lease)
                if not members:
                    del self._held[keys[2]]
        tpm = quota.tokens_per_minute or 0
        if lease is None and not (tpm and token_delta):
            return
        args: list[int | str] = [tpm, token_delta, lease or "", self.period_ms]
        await self._call(self._one(self._settle, [keys[1], keys[2]], args), self.cluster)

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())

    async def _renew_loop(self) -> None:
        """Keep the leases of running requests (long streams) from expiring."""
        while self._held:
            await asyncio.sleep(self.lease / 3)
            for set_key, members in list(self._held.items()):
                if not members:
                    continue
                try:
                    await self._call(
                        self._one(self._renew, [set_key], [round(self.lease * 1000), *members])
                    )
                except StoreError as exc:
                    log.debug("could not renew in-flight leases: %s", exc)

    async def ping(self) -> bool:
        try:
            return bool(await self._call(self.client.ping()))
        except StoreError:
            return False

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._renewer
            self._renewer = None
        if self._closes_client:
            await self.client.aclose()
        if self._pool is not None:
            await close_pool(self._pool)
            self._pool = None


def open_limiter(store: StoreConfig, shared: SharedRedis | None) -> RedisLimiter:
    """The limiter of `store`: on the application's shared connections where it opened
    them, else on connections of its own (a client with the limiter's short timeouts
    for one server; the shared kind for Sentinel or a cluster)."""
    if shared is not None:
        return RedisLimiter(
            client_for(shared), store.prefix, closes_client=not isinstance(shared, RedisCluster)
        )
    if store.sentinel is None and not store.cluster:
        return RedisLimiter(connect(store.url), store.prefix)
    own = open_pool(store)
    return RedisLimiter(
        client_for(own), store.prefix, closes_client=not isinstance(own, RedisCluster), pool=own
    )
