"""What a node admits before any handler runs: rate limits, size caps, connection bounds.

These checks run in the rpc layer before a request is unpacked, so a refused call costs a
comparison and changes nothing.

Rate limits: every caller holds a CA-issued certificate, but a buggy or compromised site
or script can still loop on a method and starve the node's worker threads and Raft. A
token bucket per (certificate name, service) lets normal traffic through untouched,
bursts included, and answers a runaway caller `rate_limited` with the seconds after which
its next call would pass (pure: the clock is injected).

Size caps: gRPC's own receive limit stays at `wire.MAX_MESSAGE_BYTES` (models and updates
need it); methods that only ever carry a few fields get `SMALL_REQUEST_BYTES`, so nobody
makes the node parse megabytes of msgpack where a site id and a number were expected.

Timeouts: every handler is bounded by itself (Poll waits at most `wire.POLL_WAIT_MAX_S`,
replicated writes 10 s, blob pushes 15 s, membership changes their `timeout_s` of at most
300 s); the options below bound connections: idle ones close, every one is re-handshaken
after `MAX_CONNECTION_AGE_MS` (so an expired certificate is noticed), with a grace longer
than the longest handler so no call is cut short.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from coordinator import wire

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

SMALL_REQUEST_BYTES = 64 * 1024
LARGE_REQUESTS = frozenset({
    (wire.FLEET_SERVICE, "Submit"),  # updates and masked vectors
    (wire.ADMIN_SERVICE, "PutBlob"),  # model blobs pushed between nodes
    (wire.ADMIN_SERVICE, "InitModel"),  # the genesis model
})

MAX_CONNECTION_IDLE_MS = 5 * 60_000
MAX_CONNECTION_AGE_MS = 30 * 60_000
MAX_CONNECTION_AGE_GRACE_MS = 6 * 60_000  # > the longest handler (membership, 300 s)
MAX_CONCURRENT_STREAMS = 32  # per connection; agents and the CLI use one or two
MIN_CLIENT_PING_INTERVAL_MS = 5_000  # clients ping every 10 s (wire.GRPC_OPTIONS)

SERVER_OPTIONS: list[tuple[str, Any]] = [
    *wire.GRPC_OPTIONS,
    ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
    ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
    ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_MS),
    ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
]


def request_cap(service: str, method: str) -> int:
    """The largest request `service/method` accepts, in bytes."""
    if (service, method) in LARGE_REQUESTS:
        return wire.MAX_MESSAGE_BYTES
    return SMALL_REQUEST_BYTES


def service_limits(fleet: Limit, admin: Limit) -> dict[str, Limit]:
    """The rate limit of each API, as the node configures its RateLimiter."""
    return {wire.FLEET_SERVICE: fleet, wire.ADMIN_SERVICE: admin}


def admit(limiter: RateLimiter | None, caller: str, service: str, method: str,
          size: int) -> dict[str, Any] | None:
    """None when the call may go on to its handler, else the error reply: the caller's
    rate first (a refused call spends no token), then the method's size cap."""
    if limiter is not None:
        wait = limiter.acquire(caller, service)
        if wait > 0:
            retry = round(max(wait, 0.001), 3)
            return wire.error("rate_limited", f"too many calls to {service} from {caller!r}; "
                              f"retry in {retry:g} s", retry_after_s=retry)
    cap = request_cap(service, method)
    if size > cap:
        return wire.error("too_large", f"{method} requests are limited to {cap} bytes, "
                          f"got {size}")
    return None
