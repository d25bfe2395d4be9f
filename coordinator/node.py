"""One coordinator node: the composition root that builds its services and wires them.

No policy lives here. The replica (Raft around the pure state machine), the blob
service, membership, the round driver, the API handlers and the audit writer are built
in order, each given the services it uses; the node starts and stops them, and turns
applied commands into the few cheap notifications other parts wait for.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from coordinator import api, wire
from coordinator.audit.writer import AuditWriter, load_signer
from coordinator.cluster import metrics, pki, rpc, throttle
from coordinator.cluster.audit_head import AuditHeadPublisher
from coordinator.cluster.blobs import BlobService, BlobStore
from coordinator.cluster.config import NodeConfig
from coordinator.cluster.disk import MIB, DiskWatch
from coordinator.cluster.membership import Membership
from coordinator.cluster.presence import OnlineSites, TaskBell
from coordinator.cluster.raft_tls import RaftTls
from coordinator.cluster.replica import AuditLink, Replica
from coordinator.cluster.snapshot import CompactionPolicy
from coordinator.core import commands
from coordinator.core.queries import Fresh, retained_versions
from coordinator.round.driver import RoundDriver
from coordinator.round.mask_pool import MaskPool

log = logging.getLogger(__name__)


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.id = config.self_addr.id
        self.identity = pki.Identity(config.ca, config.cert, config.key)
        config.data_dir.mkdir(parents=True, exist_ok=True)  # blobs, Raft journal, SQLite audit
        self.online = OnlineSites()
        self.bell = TaskBell()
        self._stopping = threading.Event()
        # Everything the replica's hook touches exists before the replica: replaying the
        # journal applies commands as soon as it is built.
        self.metrics = metrics.NodeMetrics()
        self.disk = DiskWatch(config.data_dir, config.min_free_mb * MIB,
                              2 * config.min_free_mb * MIB, on_change=self._disk_changed)
        self.disk.check()  # a node started on a full disk starts paused
        self.peer_channels = rpc.PeerChannels(self.identity)
        self.audit = AuditWriter(config.audit_db, load_signer(config.audit_key),
                                 on_written=self.metrics.audit_written,
                                 from_peers=self._audit_from_peers)
        self.blobs = BlobService(BlobStore(config.data_dir / "blobs"), self.id,
                                 self.peer_channels,
                                 peers=lambda: self.membership.peers(),
                                 cluster_size=lambda: self.membership.cluster_size())
        self.replica = Replica(
            config.self_addr.raft, [p.raft for p in config.peers], config.data_dir / "raft",
            config.raft_password, (config.election_min_s, config.election_max_s),
            on_applied=self._on_applied, join=config.join, bind=config.raft_bind,
            paused=self.disk.full, tls=RaftTls.from_identity(self.identity, self._node_at), node_id=self.id,
            compaction=CompactionPolicy(entries=config.snapshot_entries),
            audit=AuditLink(self.audit.idle, self.audit.through, self.audit.snapshot_installed))
        self.membership = Membership(self.replica, config, self.identity)
        self.audit_heads = AuditHeadPublisher(self.replica, self.audit.latest_head)
        self.metrics.watch(self._metrics_view())
        # Only the leader unmasks; its helper processes start at the first long vector.
        self.mask_pool = MaskPool(config.unmask_workers)
        self.driver = RoundDriver(self.id, self.replica, self.blobs, self.membership.cluster_size,
                                  self.online, self.bell, self.mask_pool, metrics=self.metrics,
                                  paused=self.disk.full)
        self.api = api.NodeApi(config.self_addr, self.replica, self.blobs, self.membership,
                               self.driver, self.online, self.bell, self._stopping,
                               lambda: self.disk.reason() if self.disk.full() else None,
                               lambda: self.audit.damage, self._audit_entries)
        self._servers(config)

    def _servers(self, config: NodeConfig) -> None:
        limiter = throttle.RateLimiter(throttle.service_limits(config.fleet_limit,
                                                               config.admin_limit))
        self.fleet_server = rpc.AsyncServer(
            self.identity, config.self_addr.fleet, wire.FLEET_SERVICE, self.api.fleet_methods(),
            {"Poll": self.api.fleet_poll_async}, workers=config.fleet_workers,
            observe=self.metrics.observe_rpc, limiter=limiter)
        self.admin_server = rpc.make_server(
            self.identity, config.self_addr.admin, {wire.ADMIN_SERVICE: self.api.admin_methods()},
            observe=self.metrics.observe_rpc, limiter=limiter)

    def _metrics_view(self) -> metrics.NodeView:
        """The levels /metrics reads at scrape time: Raft status, the ledger, sites online."""

        def ledger() -> dict[str, Any]:
            # built fresh from numbers and flags: no deep copy of every site under the lock
            return self.replica.state.read(lambda s: Fresh({
                "last_round": len(s["versions"]) - 1,
                "sites": {k: {"spent": v["spent"], "epsilon": v["budget"]["epsilon"],
                              "revoked": v["revoked"]} for k, v in s["sites"].items()},
            })).value

        def online() -> int:
            # only the leader sees polls (followers redirect), so only its count is real
            return len(self.online.online()) if self.replica.is_leader() else 0

        return metrics.NodeView(self.id, self.replica.status, ledger, online)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.fleet_server.start()
        self.admin_server.start()
        if self.config.metrics_bind:
            host, port = self.metrics.serve(self.config.metrics_bind)
            log.info("node %s serves /metrics on %s:%s", self.id, host, port)
        threading.Thread(target=self.driver.run, name="round-driver", daemon=True).start()
        retained = lambda: self.replica.state.read(  # noqa: E731
            lambda s: sorted(retained_versions(s)))
        threading.Thread(target=self.blobs.follow, args=(retained, self._stopping),
                         name="blob-fetcher", daemon=True).start()
        threading.Thread(target=self.audit_heads.run, args=(self._stopping,),
                         name="audit-head", daemon=True).start()
        threading.Thread(target=self.disk.run, args=(self._stopping,),
                         name="disk-watch", daemon=True).start()
        log.info("node %s up: raft %s fleet %s admin %s", self.id, self.config.self_addr.raft,
                 self.config.self_addr.fleet, self.config.self_addr.admin)

    def stop(self) -> None:
        self._stopping.set()
        self.driver.stop()
        self.bell.ring()
        self.fleet_server.stop(1)
        self.admin_server.stop(1)
        self.replica.destroy()
        self.blobs.close()
        self.mask_pool.close()
        self.audit.close()
        self.metrics.close()

    def wait(self) -> None:
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        done.wait()
        self.stop()

    def _node_at(self, raft: str) -> str | None:
        """The id of the member at a Raft address (static config until membership is up):
        the name a peer's Raft certificate must carry."""
        membership = getattr(self, "membership", None)
        if membership is not None:
            found = membership.address(raft)
            return found.id if found else None
        return next((n.id for n in self.config.all_nodes if n.raft == raft), None)

    def _disk_changed(self, full: bool) -> None:
        """A leader whose disk filled hands leadership to a member that can still write."""
        replica = getattr(self, "replica", None)
        if not full or replica is None or not replica.is_leader():
            return

        def hand_over() -> None:
            try:
                new = replica.transfer_leadership(None, 10.0)
                log.warning("disk full: leadership handed to %s", new)
            except Exception as exc:  # the others may be down too: then nobody writes
                log.error("disk full and leadership could not be handed over: %s", exc)

        threading.Thread(target=hand_over, name="disk-full-handover", daemon=True).start()

    # ------------------------------------------------------------ replicated-state hooks

    def _audit_entries(self, after: int, limit: int) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.audit.store.entries_after_raft_index(after, limit)]

    def _audit_from_peers(self, after: int, limit: int) -> list[dict[str, Any]] | None:
        """The first peer's audit entries after command `after` (for the catch-up after a
        snapshot); [] when no peer has any yet, None when this node has no peer."""
        peers = self.membership.peers()
        if not peers:
            return None
        for peer in peers:
            try:
                reply = self.peer_channels.get(peer).call(
                    wire.ADMIN_SERVICE, "AuditEntries", {"after": after, "limit": limit},
                    timeout=10.0)
            except Exception as exc:
                log.debug("audit entries from %s: %s", peer.id, exc)
                continue
            if reply.get("ok") and reply.get("entries"):
                return reply["entries"]
        return []

    def _on_applied(self, command: dict, result: dict, state: dict) -> None:
        """Runs on the Raft thread: only cheap bookkeeping here."""
        self.audit.record(command, result, state)
        self.metrics.on_applied(command, result, state)
        if not result.get("ok"):
            return
        op = command.get("op")
        if op in commands.MODEL_VERSIONS and isinstance(command.get("version"), str):
            self.blobs.want(command["version"])
        if op in commands.ROUND_EVENTS:
            self.bell.ring()
