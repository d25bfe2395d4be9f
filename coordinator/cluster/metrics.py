"""Prometheus metrics for one node, served as plain text over HTTP at `/metrics`.

Two kinds of series. Event counters and histograms (round stages, RPC traffic, audit
appends, commands the replica applied) are updated where the event happens. Levels
(Raft role and indices, clients online, each site's privacy spend) are read from the
node when Prometheus scrapes, so they can never drift from what the node holds.

Counters fed by applied commands count what this process applied: a restarted node
replays its Raft journal and so reports the cluster's totals again, and every node
reports the same totals once it has caught up.

The endpoint is plain HTTP without authentication. It exposes no secret, but site ids
and privacy spend are operational data: bind it to loopback or a monitoring network
and let the network policy decide who may scrape it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.core import commands

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger(__name__)

STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
                 300.0)
RAFT_ROLES = ("follower", "candidate", "leader")
ABORT_CLASSES = frozenset({"leader_change", "driver_restart", "too_few_updates",
                           "aggregation_failed", "blob_replication_failed", "refused",
                           "invalid_aggregate"})


def abort_class(reason: str) -> str:
    """The bounded label for an abort reason: its leading word if known, else `other`.

    Reasons carry free text (counts, error messages); labels must not, or every abort
    would create a new series.
    """
    m = re.match(r"[a-z_]+", reason)
    word = m.group(0) if m else ""
    return word if word in ABORT_CLASSES else "other"


def parse_bind(bind: str) -> tuple[str, int]:
    """`host:port` (IPv6 hosts in brackets) as the pair an HTTP server binds."""
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected host:port, got {bind!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class NodeView:
    """Where the scrape-time levels come from: Raft status, the replicated ledger's levels
    (`last_round`, `sites` -> spent, epsilon, revoked) and the count of sites online
    (callables, read at scrape time; the node passes its services', tests fake them)."""

    node_id: str
    raft: Callable[[], dict[str, Any]]
    ledger: Callable[[], dict[str, Any]]
    online: Callable[[], int]


class NodeCollector(Collector):
    """Gauges read from the node at scrape time."""

    def __init__(self, view: NodeView) -> None:
        self.view = view

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration; the node may not be up yet

    def collect(self) -> Iterator[Metric]:
        v = self.view
        info = GaugeMetricFamily("fedraft_node_info", "This node's id (always 1).", labels=["node"])
        info.add_metric([v.node_id], 1)
        yield info
        try:
            raft = v.raft()
        except Exception:
            log.debug("metrics: raft status unavailable", exc_info=True)
        else:
            role = GaugeMetricFamily("fedraft_raft_role",
                                     "1 for this node's current Raft role, 0 for the others.",
                                     labels=["role"])
            for name in RAFT_ROLES:
                role.add_metric([name], 1.0 if raft.get("state") == name else 0.0)
            yield role
            for key, name, text in (
                ("term", "fedraft_raft_term", "Current Raft term."),
                ("commit_index", "fedraft_raft_commit_index", "Highest log index known committed."),
                ("last_applied", "fedraft_raft_last_applied",
                 "Highest log index applied to the state machine."),
                ("has_quorum", "fedraft_raft_has_quorum",
                 "1 when this node is connected to a quorum of the cluster (counting itself)."),
                ("log_len", "fedraft_raft_log_entries", "Entries in this node's Raft log."),
            ):
                if raft.get(key) is not None:
                    yield GaugeMetricFamily(name, text, value=float(raft[key]))
        try:
            online = v.online()
        except Exception:
            log.debug("metrics: online sites unavailable", exc_info=True)
        else:
            yield GaugeMetricFamily(
                "fedraft_clients_online",
                "Sites that polled this node within the online window (leader only; 0 elsewhere).",
                value=float(online))
        try:
            ledger = v.ledger()
        except Exception:
            log.debug("metrics: ledger unavailable", exc_info=True)
            return
        yield GaugeMetricFamily("fedraft_round_last_committed",
                                "Round of the newest committed model version (-1 before genesis).",
                                value=float(ledger["last_round"]))
        sites = ledger["sites"]
        yield GaugeMetricFamily("fedraft_sites_enrolled", "Enrolled sites, revoked ones included.",
                                value=float(len(sites)))
        spent = GaugeMetricFamily("fedraft_site_epsilon_spent",
                                  "Privacy spent per site (cumulative epsilon on the replicated ledger).",
                                  labels=["site"])
        budget = GaugeMetricFamily("fedraft_site_epsilon_budget",
                                   "Privacy budget per site (epsilon cap on the replicated ledger).",
                                   labels=["site"])
        for site, rec in sorted(sites.items()):
            spent.add_metric([site], float(rec["spent"]))
            budget.add_metric([site], float(rec["epsilon"]))
        yield spent
        yield budget


class NodeMetrics:
    """Every series one node exports, in its own registry (never the global one)."""

    def __init__(self) -> None:
        disable_created_metrics()  # the *_created series only add noise to every scrape
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.leader_changes = Counter(
            "fedraft_leader_changes", "Leader changes applied (fenced claims after the first).",
            registry=r)
        self.rounds_committed = Counter(
            "fedraft_rounds_committed", "Rounds committed (round_commit applied).", registry=r)
        self.rounds_aborted = Counter(
            "fedraft_rounds_aborted", "Round attempts aborted (round_abort applied), by reason class.",
            ["reason"], registry=r)
        self.stage_seconds = Histogram(
            "fedraft_round_stage_seconds",
            "Seconds the leader spent in each round stage, attempts later aborted included.",
            ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.rpc_requests = Counter(
            "fedraft_rpc_requests", "gRPC requests handled, by service, method and result code.",
            ["service", "method", "code"], registry=r)
        self.rpc_received = Counter(
            "fedraft_rpc_received_bytes", "Request bytes received (msgpack bodies).",
            ["service", "method"], registry=r)
        self.rpc_sent = Counter(
            "fedraft_rpc_sent_bytes", "Response bytes sent (msgpack bodies).",
            ["service", "method"], registry=r)
        self.sites_quarantined = Counter(
            "fedraft_sites_quarantined", "Sites the leader quarantined after finding them behind "
            "an invalid secure sum.", registry=r)
        self.audit_entries = Counter(
            "fedraft_audit_entries_written", "Entries this node appended to its audit log, by kind.",
            ["kind"], registry=r)
        ProcessCollector(registry=r)
        self._server: WSGIServer | None = None

    # ------------------------------------------------------------ sources

    def watch(self, view: NodeView) -> None:
        """Add the scrape-time gauges of a node (once its replica exists)."""
        self.registry.register(NodeCollector(view))

    def on_applied(self, command: dict[str, Any], result: dict[str, Any],
                   state: dict[str, Any]) -> None:
        """Count round and leadership events; runs on the Raft thread, so only increments."""
        if not result.get("ok") or result.get("replayed"):
            return
        op = command.get("op")
        if op == commands.ROUND_COMMIT:
            self.rounds_committed.inc()
        elif op == commands.ROUND_ABORT:
            self.rounds_aborted.labels(abort_class(str(command.get("reason", "")))).inc()
        elif op == commands.QUARANTINE:
            self.sites_quarantined.inc()
        elif op == commands.CLAIM and result.get("new") and len(state.get("leader_history", ())) > 1:
            self.leader_changes.inc()

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(max(0.0, seconds))

    def observe_rpc(self, service: str, method: str, code: str, received: int, sent: int) -> None:
        """One handled request (the rpc module's observer hook)."""
        self.rpc_requests.labels(service, method, code).inc()
        self.rpc_received.labels(service, method).inc(received)
        self.rpc_sent.labels(service, method).inc(sent)

    def audit_written(self, kind: str) -> None:
        self.audit_entries.labels(kind).inc()

    # ------------------------------------------------------------ exposition

    def exposition(self) -> str:
        """The current text exposition format (what `/metrics` returns)."""
        return generate_latest(self.registry).decode()

    def serve(self, bind: str) -> tuple[str, int]:
        """Serve `/metrics` on `bind` (port 0 picks one) in a daemon thread; returns the
        address actually bound."""
        host, port = parse_bind(bind)
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return host, server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class StageClock:
    """Times the consecutive stages of one round attempt: a stage ends when the next
    begins, so every second of the attempt lands in exactly one stage."""

    def __init__(self, on_stage: Callable[[str, float], None]) -> None:
        self._on_stage = on_stage
        self.stage: str | None = None
        self._since = 0.0

    def enter(self, stage: str) -> None:
        """End the current stage (if any, and if different) and start `stage`."""
        if stage == self.stage:
            return
        self.close()
        self.stage, self._since = stage, time.monotonic()

    def discard(self) -> None:
        """Forget the current stage unreported (an attempt that never opened)."""
        self.stage = None

    def close(self) -> None:
        """End the current stage, reporting its duration once."""
        if self.stage is not None:
            stage, self.stage = self.stage, None
            self._on_stage(stage, time.monotonic() - self._since)
