"""Per-method request size caps, per-caller rate limits and the servers' connection bounds.

Why here and not in each handler: these checks run in the rpc layer before a request is
unpacked or any handler runs, so a refused call costs one comparison and changes nothing.
gRPC's own receive limit stays at `wire.MAX_MESSAGE_BYTES` (models and updates need it);
methods that only ever carry a few fields get `SMALL_REQUEST_BYTES`, so nobody makes the
node parse megabytes of msgpack where a site id and a number were expected.

Timeouts: every handler is bounded by itself (Poll waits at most `wire.POLL_WAIT_MAX_S`,
replicated writes 10 s, blob pushes 15 s, membership changes their `timeout_s` of at most
300 s); the options below bound connections: idle ones close, every one is re-handshaken
after `MAX_CONNECTION_AGE_MS` (so an expired certificate is noticed), with a grace longer
than the longest handler so no call is cut short.
"""

from __future__ import annotations

from typing import Any

from coordinator import wire
from coordinator.ratelimit import Limit, RateLimiter

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
