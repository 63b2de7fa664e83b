"""The PostgreSQL limiter: one statement per check, shared by every worker and replica.

A check is one call of the function `chat_proxy.acquire` (proxy/pgstore.py), which
locks the key's row of counters, checks the request bucket, the token bucket and the
key's count of requests in flight together by the server's clock, and counts all or
nothing; the end of a request is one call of `chat_proxy.settle`. Each request in
flight also holds a lease with an expiry, renewed while it runs: a replica that dies
leaves leases that expire, and the check that finds the key at its limit drops them
and counts again, so the slots come back. Leases past their expiry and the rows of
keys whose buckets are full again are swept once a minute.

Failures (the server down, slow, restarted) raise StoreError fast: every call has a
one-second budget, and after a failure the limiter does not try again for a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

from proxy.pgstore import ERRORS, Database, SchemaTooNew
from proxy.ratelimit import StoreError
from proxy.ratelimit.algorithm import PERIOD, Decision, Quota, Window

log = logging.getLogger("chat_proxy.rate_limit")

T = TypeVar("T")

# what a call raises when the database cannot serve it
_FAILURES: tuple[type[BaseException], ...] = (*ERRORS, SchemaTooNew)

COOLDOWN = 1.0  # seconds without trying the server after it failed
CALL_TIMEOUT = 1.0  # seconds: the most a check may wait for it
SWEEP_EVERY = 60.0  # seconds between sweeps of idle counters

_ACQUIRE = (
    "SELECT chat_proxy.acquire($1::text, $2::int8, $3::int8, $4::int8, $5::int8, $6::text, "
    "$7::float8, $8::float8)"
)
_SETTLE = "SELECT chat_proxy.settle($1::text, $2::int8, $3::int8, $4::text, $5::float8)"
_INT8 = 2**63 - 1


def _int8(value: int) -> int:
    """A limit, cost or delta as a bigint takes it (any limit above is as good as none)."""
    return max(-_INT8, min(value, _INT8))


_RENEW = (
    "UPDATE chat_proxy.leases l SET expires = extract(epoch FROM clock_timestamp()) * 1000 + $3 "
    "FROM unnest($1::text[], $2::text[]) AS held(key, member) "
    "WHERE l.key = held.key AND l.member = held.member"
)
# leases past their expiry belong to requests whose replica is gone (the key's count
# still holds them until a check at the limit counts again); counters whose buckets
# are full again, with nothing in flight, equal fresh ones (in_flight is checked on
# the row as it is once locked, so a check that just took a lease keeps its row)
_SWEEP_LEASES = (
    "DELETE FROM chat_proxy.leases WHERE expires < extract(epoch FROM clock_timestamp()) * 1000"
)
_SWEEP_LIMITS = (
    "DELETE FROM chat_proxy.limits c WHERE c.in_flight = 0 "
    "AND greatest(c.requests_tat, c.tokens_tat) < extract(epoch FROM clock_timestamp()) * 1000 "
    "AND NOT EXISTS (SELECT 1 FROM chat_proxy.leases l WHERE l.key = c.key)"
)


class PostgresLimiter:
    scope = "shared"

    def __init__(
        self,
        db: Database,
        *,
        lease: float = 60.0,
        period: float = PERIOD,
        owns_db: bool = False,
    ) -> None:
        """On the process's database; `owns_db`: close it with the limiter (else the
        session store, which shares it, does)."""
        self.db = db
        self.lease = lease
        self.period_ms = period * 1000.0
        self._owns_db = owns_db
        self._down_until = 0.0
        self._held: dict[str, set[str]] = {}  # key -> lease members
        self._renewer: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def _call(self, work: Awaitable[T]) -> T:
        if time.monotonic() < self._down_until:
            if asyncio.iscoroutine(work):
                work.close()
            raise StoreError("PostgreSQL was unreachable a moment ago")
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                return await work
        except _FAILURES as exc:
            self._down_until = time.monotonic() + COOLDOWN
            raise StoreError(f"{type(exc).__name__}: {exc}") from exc

    async def acquire(self, key: str, quota: Quota, cost: int) -> Decision:
        rpm = _int8(quota.requests_per_minute or 0)
        tpm = _int8(quota.tokens_per_minute or 0)
        maxc = _int8(quota.max_concurrent or 0)
        member = uuid.uuid4().hex if maxc else ""
        raw: Any = await self._call(
            self.db.fetchval(
                CALL_TIMEOUT,
                _ACQUIRE,
                key,
                rpm,
                tpm,
                maxc,
                _int8(cost),
                member,
                self.lease * 1000.0,
                self.period_ms,
            )
        )
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
            self._held.setdefault(key, set()).add(member)
            self._ensure_renewer()
        self._ensure_sweeper()
        return Decision(
            allowed=bool(allowed),
            requests=Window(rpm, r_rem, r_reset / 1000) if rpm else None,
            tokens=Window(tpm, t_rem, t_reset / 1000) if tpm else None,
            exceeded=exceeded,
            retry_after=retry / 1000,
            lease=lease,
            in_flight=in_flight,
        )

    async def settle(self, key: str, quota: Quota, lease: str | None, token_delta: int) -> None:
        if lease is not None:
            members = self._held.get(key)
            if members is not None:
                members.discard(lease)
                if not members:
                    del self._held[key]
        tpm = _int8(quota.tokens_per_minute or 0)
        if lease is None and not (tpm and token_delta):
            return
        await self._call(
            self.db.execute(
                CALL_TIMEOUT, _SETTLE, key, tpm, _int8(token_delta), lease or "", self.period_ms
            )
        )

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def _renew_loop(self) -> None:
        """Keep the leases of running requests (long streams) from expiring."""
        while self._held:
            await asyncio.sleep(self.lease / 3)
            keys: list[str] = []
            members: list[str] = []
            for key, held in list(self._held.items()):
                for member in held:
                    keys.append(key)
                    members.append(member)
            if not keys:
                continue
            try:
                await self._call(
                    self.db.execute(CALL_TIMEOUT, _RENEW, keys, members, self.lease * 1000.0)
                )
            except StoreError as exc:
                log.debug("could not renew in-flight leases: %s", exc)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            try:
                await self.sweep()
            except _FAILURES as exc:
                log.debug("could not sweep idle rate-limit counters: %s", exc)

    async def sweep(self) -> None:
        """Drop the leases past their expiry and the counters that are full again."""
        await self.db.execute(10.0, _SWEEP_LEASES)
        await self.db.execute(10.0, _SWEEP_LIMITS)

    async def ping(self) -> bool:
        try:
            return await self._call(self.db.ping(CALL_TIMEOUT))
        except StoreError:
            return False

    async def close(self) -> None:
        for task in (self._renewer, self._sweeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._renewer = self._sweeper = None
        if self._owns_db:
            await self.db.close()
