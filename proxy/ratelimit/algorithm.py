"""GCRA, the generic cell rate algorithm, and the types every limiter shares.

A limit of L per minute is a bucket that holds L units and refills continuously at
L/60 units per second; its whole state is one number, the theoretical arrival time
(TAT): the moment the bucket would be full again. A request costing `c` units moves
the TAT by `c * 60/L` seconds and is admitted when the TAT stays within one minute
of now. There is no window, so there is no boundary at which a second full burst
fits: after the first burst, units come back one interval at a time.

Requests use cost 1; tokens use GCRA with a cost (the reserved estimate), and are
settled afterwards by moving the TAT back (a refund) or forward (a charge). The Lua
script of the Redis limiter is the same arithmetic in milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PERIOD = 60.0  # seconds: every limit here is "per minute"
_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Quota:
    """The limits that apply to one request; None: no limit of that kind."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None

    def __bool__(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute or self.max_concurrent)


@dataclass(frozen=True, slots=True)
class Window:
    """The state of one per-minute limit as the client sees it in the headers."""

    limit: int
    remaining: int
    reset: float  # seconds until the bucket is full again


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of a limiter: admitted or not, with what the headers report."""

    allowed: bool
    requests: Window | None = None
    tokens: Window | None = None
    exceeded: tuple[str, ...] = ()  # of "concurrent", "requests", "tokens"
    retry_after: float = 0.0  # seconds
    lease: str | None = None  # the concurrency slot held, given back by settle()
    in_flight: int = 0
    # the answer of a script sent with the check (the Redis limiter's `also`)
    looked_up: object = None


@dataclass(frozen=True, slots=True)
class Step:
    """The outcome of one GCRA check."""

    allowed: bool
    tat: float  # the new TAT when admitted, else the unchanged one
    remaining: int
    reset: float
    retry_after: float


def gcra(tat: float, now: float, limit: int, cost: int, period: float = PERIOD) -> Step:
    """Check (and, when admitted, spend) `cost` units of a `limit`-per-`period` bucket."""
    return Step(*gcra_fields(tat, now, limit, cost, period))


def gcra_fields(
    tat: float, now: float, limit: int, cost: int, period: float = PERIOD
) -> tuple[bool, float, int, float, float]:
    """`gcra` as a plain tuple (allowed, tat, remaining, reset, retry_after), for the
    in-process limiter, which reads the fields without keeping them."""
    interval = period / limit
    base = tat if tat > now else now
    new = base + cost * interval
    if new - now <= period + _EPS:
        remaining = math.floor((period - (new - now)) / interval + _EPS)
        return True, new, remaining if remaining > 0 else 0, new - now, 0.0
    remaining = math.floor((period - (base - now)) / interval + _EPS)
    return False, tat, remaining if remaining > 0 else 0, base - now, new - now - period


def settle(tat: float, now: float, limit: int, delta: int, period: float = PERIOD) -> float:
    """The TAT after charging `delta` more units (a negative delta refunds)."""
    return max(max(tat, now) + delta * (period / limit), now)


def format_reset(seconds: float) -> str:
    """A duration the way OpenAI's x-ratelimit-reset-* headers write it: "20ms",
    "1s", "1.5s", "6m0s", "1h2m3s"."""
    ms = max(0, math.ceil(seconds * 1000 - _EPS * 1000))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
