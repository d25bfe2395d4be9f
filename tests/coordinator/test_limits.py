"""Hardening of the rpc layer: token buckets (with an injected clock), per-method size caps,
a throttled call over a real mTLS gRPC server, and the node configuration's [limits]."""

from __future__ import annotations

import math
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator import api, wire
from coordinator.cluster import pki, rpc, throttle
from coordinator.cluster.config import (
    ConfigError,
    NodeAddress,
    default_unmask_workers,
    load_node_config,
    render_node_config,
)
from coordinator.cluster.throttle import DEFAULT_ADMIN, DEFAULT_FLEET, Limit, RateLimiter, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(Limit(rate=2.0, burst=3.0), now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)  # one token comes back in 1/rate s
    assert bucket.take(0.25) == pytest.approx(0.25)  # refused calls spend nothing
    assert bucket.take(0.5) == 0.0
    assert bucket.take(0.5) > 0
    assert bucket.take(100.0) == 0.0 and bucket.tokens == pytest.approx(2.0)  # capped at burst
    assert bucket.take(50.0) == 0.0 and bucket.tokens == pytest.approx(1.0)  # no refill backwards
    assert bucket.take(100.5) == 0.0 and bucket.tokens == pytest.approx(1.0)  # from t=100 on


def test_disabled_limit_and_bad_limits() -> None:
    off = TokenBucket(Limit(rate=0.0, burst=0.0), now=0.0)
    assert all(off.take(0.0) == 0.0 for _ in range(1000))
    for rate, burst in ((-1.0, 5.0), (math.nan, 5.0), (1.0, 0.5), (math.inf, 5.0), (1.0, math.inf)):
        with pytest.raises(ValueError):
            Limit(rate, burst)


def test_limiter_keys_by_caller_and_kind() -> None:
    clock = Clock()
    limiter = RateLimiter({"fleet": Limit(1.0, 2.0), "admin": Limit(0.0, 0.0)}, clock=clock)
    assert [limiter.acquire("site-a", "fleet") for _ in range(2)] == [0.0, 0.0]
    assert limiter.acquire("site-a", "fleet") == pytest.approx(1.0)
    assert limiter.acquire("site-b", "fleet") == 0.0  # another caller has its own bucket
    assert all(limiter.acquire("site-a", k) == 0.0 for k in ("admin", "unknown"))
    clock.now += 1.0
    assert limiter.acquire("site-a", "fleet") == 0.0


def test_limiter_forgets_idle_buckets_when_full() -> None:
    clock = Clock()
    limiter = RateLimiter({"fleet": Limit(1.0, 1.0)}, clock=clock, max_buckets=3)
    for name in ("a", "b", "c"):
        limiter.acquire(name, "fleet")
    assert limiter.acquire("d", "fleet") == 0.0 and len(limiter) == 4  # none idle yet
    clock.now += 10.0  # all refilled: as good as new
    limiter.acquire("e", "fleet")
    assert len(limiter) == 1


def test_limiter_is_thread_safe() -> None:
    clock = Clock()
    limiter = RateLimiter({"fleet": Limit(1.0, 100.0)}, clock=clock)
    granted: list[int] = []

    def worker() -> None:
        granted.append(sum(limiter.acquire("site", "fleet") == 0.0 for _ in range(50)))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 100  # exactly the burst, the clock standing still


def test_defaults_cover_normal_traffic() -> None:
    # a site: one long Poll per 5-10 s idle, a Poll + Submit per stage, 2 GetBlobs a round
    assert DEFAULT_FLEET.rate >= 10 and DEFAULT_FLEET.burst >= 30
    # scripts and tests poll Status / RoundStatus every 10-20 ms
    assert DEFAULT_ADMIN.rate >= 100


def test_size_caps_per_method() -> None:
    small = throttle.SMALL_REQUEST_BYTES
    for service, method in ((wire.FLEET_SERVICE, "Poll"), (wire.FLEET_SERVICE, "GetBlob"),
                            (wire.ADMIN_SERVICE, "Enroll"), (wire.ADMIN_SERVICE, "Train"),
                            (wire.ADMIN_SERVICE, "AddNode"), (wire.ADMIN_SERVICE, "SetBudget")):
        assert throttle.request_cap(service, method) == small
        assert throttle.admit(None, "x", service, method, small) is None
        reply = throttle.admit(None, "x", service, method, small + 1)
        assert reply is not None and reply["code"] == "too_large"
    for service, method in throttle.LARGE_REQUESTS:
        assert throttle.request_cap(service, method) == wire.MAX_MESSAGE_BYTES
    # connections outlive the longest handler, so none is cut off mid-call
    assert throttle.MAX_CONNECTION_AGE_GRACE_MS > api.MAX_CHANGE_TIMEOUT_S * 1000
    assert throttle.MIN_CLIENT_PING_INTERVAL_MS < dict(wire.GRPC_OPTIONS)["grpc.keepalive_time_ms"]


# ---------------------------------------------------------------- a real gRPC server


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    pki.init_ca(root / "ca")
    for role, name in (("node", "n1"), ("client", "site-a"), ("client", "site-b")):
        pki.issue(root / "ca", root / name, role, name)
    return root


def _ident(root: Path, name: str) -> pki.Identity:
    return pki.Identity(root / "ca" / "ca.pem", root / name / f"{name}.pem",
                        root / name / f"{name}.key")


def test_throttled_calls_over_grpc(pki_dir: Path) -> None:
    """Past its burst a caller gets `rate_limited` with a retry-after; the handler never
    ran for it (no state change), others are not affected, and metrics see the code."""
    clock = Clock()
    limiter = RateLimiter({wire.FLEET_SERVICE: Limit(rate=1.0, burst=3.0)}, clock=clock)
    handled: list[str] = []
    observed: list[str] = []

    def poll(msg: dict[str, Any], caller: rpc.Caller) -> dict[str, Any]:
        handled.append(caller.name)
        return {"ok": True}

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = rpc.make_server(_ident(pki_dir, "n1"), f"127.0.0.1:{port}", {
        wire.FLEET_SERVICE: {"Poll": (poll, frozenset({"client"}))}},
        workers=4, observe=lambda s, m, code, *_: observed.append(code), limiter=limiter)
    server.start()
    a = rpc.channel(f"127.0.0.1:{port}", _ident(pki_dir, "site-a"))
    b = rpc.channel(f"127.0.0.1:{port}", _ident(pki_dir, "site-b"))
    try:
        replies = [a.call(wire.FLEET_SERVICE, "Poll", {}) for _ in range(5)]
        assert [r["ok"] for r in replies] == [True, True, True, False, False]
        refused = replies[3]
        assert refused["code"] == "rate_limited" and refused["retry_after_s"] == pytest.approx(1.0)
        assert "retry" in refused["error"]
        assert handled == ["site-a"] * 3
        assert b.call(wire.FLEET_SERVICE, "Poll", {})["ok"]  # its own bucket
        clock.now += 1.0
        assert a.call(wire.FLEET_SERVICE, "Poll", {})["ok"]
        too_big = b.call(wire.FLEET_SERVICE, "Poll", {"pad": b"\0" * throttle.SMALL_REQUEST_BYTES})
        assert too_big["code"] == "too_large" and handled.count("site-b") == 1
        assert observed.count("rate_limited") == 2 and observed.count("too_large") == 1
    finally:
        a.close()
        b.close()
        server.stop(0)


def test_agent_waits_the_retry_after_it_is_given(pki_dir: Path, tmp_path: Path) -> None:
    """A site throttled while polling calls again after the node's retry-after (here
    20 ms), not after the 1 s it waits on other refusals: right after a failover every
    site polls at once, and a second lost per throttled poll showed in round recovery."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from client.agent import Agent, retry_after

    assert retry_after({"retry_after_s": 0.02}) == 0.02
    assert retry_after({}) == 1.0 and retry_after({"retry_after_s": "soon"}) == 1.0
    assert retry_after({"retry_after_s": math.nan}) == 0.0
    assert retry_after({"retry_after_s": -3}) == 0.0 and retry_after({"retry_after_s": 1e9}) == 5.0

    limiter = RateLimiter({wire.FLEET_SERVICE: Limit(rate=50.0, burst=1.0)})
    polls: list[float] = []
    agent: Agent | None = None

    def poll(msg: dict[str, Any], caller: rpc.Caller) -> dict[str, Any]:
        polls.append(time.monotonic())
        if len(polls) == 4 and agent is not None:
            agent.stopped.set()
        return {"ok": True, "status": "idle"}

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = rpc.make_server(_ident(pki_dir, "n1"), f"127.0.0.1:{port}", {
        wire.FLEET_SERVICE: {"Poll": (poll, frozenset({"client"}))}}, workers=4, limiter=limiter)
    server.start()
    ident = _ident(pki_dir, "site-a")
    tls = (ident.ca.read_bytes(), ident.cert.read_bytes(), ident.key.read_bytes())
    agent = Agent("site-a", [f"127.0.0.1:{port}"], tls, Ed25519PrivateKey.generate(),
                  trainer=None, state_dir=tmp_path / "state", poll_wait_s=0.0)  # type: ignore[arg-type]
    try:
        t0 = time.monotonic()
        runner = threading.Thread(target=agent.run, daemon=True)
        runner.start()
        runner.join(10)
        assert not runner.is_alive()
        # 50 calls/s with a burst of 1: every other poll is throttled for ~20 ms
        assert len(polls) == 4
        assert time.monotonic() - t0 < 1.0, polls
    finally:
        agent.stopped.set()
        server.stop(0)


# ---------------------------------------------------------------- node.toml [limits]


def _node_toml(tmp_path: Path, extra: str = "") -> Path:
    me = NodeAddress("n1", "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
    path = tmp_path / "node.toml"
    path.write_text(render_node_config(me, [], tmp_path / "d", tmp_path / "ca.pem",
                                       tmp_path / "n1.pem", tmp_path / "n1.key") + extra)
    return path


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("FEDRAFT_RAFT_PASSWORD", "x" * 20)
    for key in ("FLEET_RPS", "FLEET_BURST", "ADMIN_RPS", "ADMIN_BURST", "FLEET_WORKERS",
                "UNMASK_WORKERS"):
        monkeypatch.delenv(f"FEDRAFT_LIMITS_{key}", raising=False)
    return monkeypatch


def test_limits_config_defaults_file_and_env(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    cfg = load_node_config(_node_toml(tmp_path))
    assert cfg.fleet_limit == DEFAULT_FLEET and cfg.admin_limit == DEFAULT_ADMIN
    cfg = load_node_config(_node_toml(tmp_path, "\n[limits]\nfleet_rps = 5\nadmin_rps = 0\n"
                                                "fleet_workers = 16\n"))
    assert cfg.fleet_limit == Limit(5.0, DEFAULT_FLEET.burst) and not cfg.admin_limit.enabled
    assert cfg.fleet_workers == 16
    assert cfg.unmask_workers == default_unmask_workers()
    env.setenv("FEDRAFT_LIMITS_FLEET_BURST", "7.5")
    assert load_node_config(_node_toml(tmp_path)).fleet_limit.burst == 7.5
    assert load_node_config(_node_toml(tmp_path, "\n[limits]\nunmask_workers = 0\n")).unmask_workers == 0
    env.setenv("FEDRAFT_LIMITS_UNMASK_WORKERS", "2")
    assert load_node_config(_node_toml(tmp_path)).unmask_workers == 2


@pytest.mark.parametrize(("extra", "variable", "key"), [
    ("\n[limits]\nfleet_rps = -1.0\n", None, r"^limits\.fleet_rps: must be >= 0"),
    ("\n[limits]\nadmin_burst = 0.5\n", None, r"^limits\.admin_burst: must be >= 1"),
    ("\n[limits]\nfleet_workers = 0\n", None, r"^limits\.fleet_workers"),
    ("\n[limits]\nfleet_rps = \"fast\"\n", None, r"^limits\.fleet_rps: expected float"),
    ("\n[limits]\nfleet_rsp = 3.0\n", None, r"^limits\.fleet_rsp: unknown key"),
    ("", ("FEDRAFT_LIMITS_ADMIN_RPS", "lots"), r"^limits\.admin_rps: expected float"),
    ("", ("FEDRAFT_LIMITS_ADMIN_RPS", "nan"), r"^limits\.admin_rps: expected a finite"),
    ("", ("FEDRAFT_RAFT_ELECTION_MAX_S", "inf"), r"^raft\.election_max_s: expected a finite"),
    ("", ("FEDRAFT_LIMITS_FLEET_WORKERS", "2.5"), r"^limits\.fleet_workers: expected int"),
    ("\n[limits]\nunmask_workers = -1\n", None, r"^limits\.unmask_workers: must be >= 0"),
])
def test_limits_config_errors_name_the_key(tmp_path: Path, env: pytest.MonkeyPatch, extra: str,
                                           variable: tuple[str, str] | None, key: str) -> None:
    if variable:
        env.setenv(*variable)
    with pytest.raises(ConfigError, match=key):
        load_node_config(_node_toml(tmp_path, extra))
