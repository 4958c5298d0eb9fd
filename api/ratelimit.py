"""Writes per caller: a token bucket per token subject, in each API process.

Each caller (the token's `sub`; the client's address when auth is disabled) may make
`burst` writes at once, refilled at `writes_per_second`: one client cannot take every
worker slot and database connection from the others. A write beyond that is a `429`
problem with `Retry-After` (when its next write will be accepted), refused before its
body is read. The buckets live in the process: with N API processes behind a load
balancer a caller gets up to N times the rate.

A dozen lines of arithmetic rather than slowapi: slowapi (through `limits`) counts fixed
or moving windows, not a bucket with a burst, keys requests before our token is verified,
and answers in its own format.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Request, Security

from api.problems import Problem
from api.security import Caller, authorize
from upsertflow.settings import RateLimit

#: Buckets kept before the full ones (idle callers: as good as new) are forgotten.
MAX_TRACKED_CALLERS = 10_000


class TokenBuckets:
    """One token bucket per key: `burst` at once, refilled at `rate` per second."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)

    def take(self, key: str) -> float:
        """Take a token for `key`: 0 if it had one, else the seconds until it will."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        tokens = self._tokens(key, now)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            if len(self._buckets) > MAX_TRACKED_CALLERS:
                self._forget_full(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate

    def _tokens(self, key: str, now: float) -> float:
        tokens, when = self._buckets.get(key, (self.burst, now))
        return min(float(self.burst), tokens + (now - when) * self.rate)

    def _forget_full(self, now: float) -> None:
        for key in [key for key in self._buckets if self._tokens(key, now) >= self.burst]:
            del self._buckets[key]


def write_buckets(settings: RateLimit) -> TokenBuckets:
    return TokenBuckets(settings.writes_per_second, settings.burst)


async def limit_writes(request: Request, caller: Annotated[Caller, Security(authorize)]) -> Caller:
    """The caller, if it may write now; a `429` otherwise."""
    buckets: TokenBuckets = request.app.state.write_buckets
    client = request.client.host if request.client else "unknown"
    key = caller.subject if caller.authenticated else f"address:{client}"
    wait = buckets.take(key)
    if wait > 0:
        retry_after = max(1, math.ceil(wait))
        raise Problem(
            429,
            "rate-limited",
            "Too many requests",
            f"too many writes from this caller: at most {buckets.rate:g} per second, "
            f"{buckets.burst} at once; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )
    return caller


def require_write(*scopes: str) -> Any:
    """A route dependency for writes: a valid token with `scopes`, within the caller's rate."""
    return Security(limit_writes, scopes=list(scopes))
