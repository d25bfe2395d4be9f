"""Per-caller token buckets for the gRPC APIs (pure: the clock is injected).

Why: every caller holds a CA-issued certificate, but a buggy or compromised site or
script can still loop on a method and starve the node's worker threads and Raft. A
token bucket per (certificate name, service) lets normal traffic through untouched,
bursts included, and answers a runaway caller `rate_limited` with the seconds after
which its next call would pass, before any handler runs (so no state changes).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Clock = Callable[[], float]

MAX_BUCKETS = 10_000
"""Buckets kept before full (idle) ones are forgotten; names come from issued certificates."""


@dataclass(frozen=True)
class Limit:
    """`rate` tokens per second up to `burst` stored; a rate of 0 turns the limit off."""

    rate: float
    burst: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate >= 0):
            raise ValueError("rate must be a finite number >= 0")
        if not (math.isfinite(self.burst) and (self.burst >= 1 or self.rate == 0)):
            raise ValueError("burst must be a finite number >= 1")

    @property
    def enabled(self) -> bool:
        return self.rate > 0


DEFAULT_FLEET = Limit(rate=20.0, burst=60.0)
"""A site long-polls (one Poll per 5-10 s when idle) and sends a few Submits and GetBlobs
per round stage: 20 per second sustained with bursts of 60 is far above that."""
DEFAULT_ADMIN = Limit(rate=200.0, burst=400.0)
"""Operators, auditors and peer nodes; scripts and tests poll Status every 10-20 ms."""


class TokenBucket:
    """One caller's bucket; not thread-safe on its own (RateLimiter locks around it)."""

    def __init__(self, limit: Limit, now: float) -> None:
        self.limit = limit
        self.tokens = float(limit.burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.stamp)  # a clock that steps back grants nothing
        self.tokens = min(self.limit.burst, self.tokens + elapsed * self.limit.rate)
        self.stamp = max(self.stamp, now)

    def take(self, now: float, cost: float = 1.0) -> float:
        """Spend `cost` tokens: 0.0 when granted, else the seconds until it would be
        (a refused call spends nothing)."""
        if not self.limit.enabled:
            return 0.0
        self._refill(now)
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.limit.rate

    def full(self, now: float) -> bool:
        """True when the bucket is as a fresh one would be, so forgetting it is harmless."""
        self._refill(now)
        return self.tokens >= self.limit.burst


class RateLimiter:
    """Token buckets keyed by (caller, kind), with one Limit per kind (e.g. a service);
    kinds without a limit are never throttled. Thread-safe."""

    def __init__(self, limits: Mapping[str, Limit], clock: Clock = time.monotonic,
                 max_buckets: int = MAX_BUCKETS) -> None:
        self.limits = dict(limits)
        self.clock = clock
        self.max_buckets = max_buckets
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._lock = threading.Lock()

    def acquire(self, caller: str, kind: str) -> float:
        """0.0 when the call may proceed, else the retry-after in seconds."""
        limit = self.limits.get(kind)
        if limit is None or not limit.enabled:
            return 0.0
        with self._lock:
            now = self.clock()
            bucket = self._buckets.get((caller, kind))
            if bucket is None:
                if len(self._buckets) >= self.max_buckets:
                    self._forget_idle(now)
                bucket = self._buckets[(caller, kind)] = TokenBucket(limit, now)
            return bucket.take(now)

    def _forget_idle(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.full(now)]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)
