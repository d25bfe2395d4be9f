"""One coordinator node: Raft replica, blob store, fleet and admin APIs, round driver.

This is the imperative shell. Decisions are commands to the replicated state machine;
what lives only here (who polled recently, the open round's running sum) is rebuilt
or abandoned on a leader change, never trusted across one.
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from coordinator import limits, metrics, pki, rpc, wire
from coordinator import state as sm
from coordinator.audit_writer import AuditWriter, load_signer
from coordinator.blobs import BlobError, BlobStore
from coordinator.config import NodeAddress, NodeConfig
from coordinator.driver import RoundDriver
from coordinator.mask_pool import MaskPool
from coordinator.membership import Membership
from coordinator.ratelimit import RateLimiter
from coordinator.replica import CommandFailed, Replica

log = logging.getLogger(__name__)

ADMIN_READERS = frozenset({"operator", "node", "auditor"})
OPERATOR_ONLY = frozenset({"operator"})  # people's decisions: no node makes them itself
NODE_ONLY = frozenset({"node"})
FLEET_CALLERS = frozenset({"client"})


class OnlineSites:
    """Sites that polled this node recently; only the leader's view is used."""

    def __init__(self, window_s: float = 8.0) -> None:
        self.window_s = window_s
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def touch(self, site: str) -> None:
        with self._lock:
            self._seen[site] = time.monotonic()

    def online(self) -> set[str]:
        cutoff = time.monotonic() - self.window_s
        with self._lock:
            return {s for s, t in self._seen.items() if t >= cutoff}


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.id = config.self_addr.id
        self.identity = pki.Identity(config.ca, config.cert, config.key)
        self.blobs = BlobStore(config.data_dir / "blobs")
        self.online = OnlineSites()
        self.tasks_changed = threading.Condition()
        self._missing_blobs: set[str] = set()
        self._fetch_wakeup = threading.Event()
        self._stopping = threading.Event()
        self._peer_channels: dict[str, wire.Channel] = {}
        self._pool = ThreadPoolExecutor(max_workers=8)
        self.metrics = metrics.NodeMetrics()  # before the replica: its hook counts replays
        self.audit = AuditWriter(config.audit_db, load_signer(config.audit_key),
                                 on_written=self.metrics.audit_written)
        self.replica = Replica(
            config.self_addr.raft,
            [p.raft for p in config.peers],
            config.data_dir / "raft",
            config.raft_password,
            (config.election_min_s, config.election_max_s),
            on_applied=self._on_applied,
            join=config.join,
        )
        self.membership = Membership(self)  # live members and endpoints, not the static config
        self.metrics.watch(metrics.node_view(self))
        # Only the leader unmasks; its helper processes start at the first long vector.
        self.mask_pool = MaskPool(config.unmask_workers)
        self.driver = RoundDriver(self)
        self.limiter = RateLimiter(limits.service_limits(config.fleet_limit, config.admin_limit))
        self.fleet_server = rpc.make_server(self.identity, config.self_addr.fleet, {
            wire.FLEET_SERVICE: {
                "Poll": (self.fleet_poll, FLEET_CALLERS),
                "GetBlob": (self.fleet_get_blob, FLEET_CALLERS),
                "Submit": (self.fleet_submit, FLEET_CALLERS),
            }
        }, workers=config.fleet_workers, observe=self.metrics.observe_rpc, limiter=self.limiter)
        self.admin_server = rpc.make_server(self.identity, config.self_addr.admin, {
            wire.ADMIN_SERVICE: {
                "Status": (self.admin_status, ADMIN_READERS),
                "Sites": (self.admin_sites, ADMIN_READERS),
                "RoundStatus": (self.admin_round_status, ADMIN_READERS),
                "GetBlob": (self.admin_get_blob, ADMIN_READERS),
                "Enroll": (self.admin_enroll, OPERATOR_ONLY),
                "Revoke": (self.admin_revoke, OPERATOR_ONLY),
                "SetBudget": (self.admin_set_budget, OPERATOR_ONLY),
                "InitModel": (self.admin_init_model, OPERATOR_ONLY),
                "Train": (self.admin_train, OPERATOR_ONLY),
                "Stop": (self.admin_stop, OPERATOR_ONLY),
                "PutBlob": (self.admin_put_blob, NODE_ONLY),
                "AddNode": (self.membership.admin_add_node, OPERATOR_ONLY),
                "RemoveNode": (self.membership.admin_remove_node, OPERATOR_ONLY),
                "TransferLeader": (self.membership.admin_transfer_leader, OPERATOR_ONLY),
            }
        }, observe=self.metrics.observe_rpc, limiter=self.limiter)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.fleet_server.start()
        self.admin_server.start()
        if self.config.metrics_bind:
            host, port = self.metrics.serve(self.config.metrics_bind)
            log.info("node %s serves /metrics on %s:%s", self.id, host, port)
        threading.Thread(target=self.driver.run, name="round-driver", daemon=True).start()
        threading.Thread(target=self._fetch_loop, name="blob-fetcher", daemon=True).start()
        log.info("node %s up: raft %s fleet %s admin %s", self.id, self.config.self_addr.raft,
                 self.config.self_addr.fleet, self.config.self_addr.admin)

    def stop(self) -> None:
        self._stopping.set()
        self.driver.stop()
        with self.tasks_changed:
            self.tasks_changed.notify_all()
        self.fleet_server.stop(1)
        self.admin_server.stop(1)
        self.replica.destroy()
        self.mask_pool.close()
        self.audit.close()
        self.metrics.close()

    def wait(self) -> None:
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        done.wait()
        self.stop()

    # ------------------------------------------------------------ replicated-state hooks

    def _on_applied(self, command: dict, result: dict, state: dict) -> None:
        """Runs on the Raft thread: only cheap bookkeeping here."""
        self.audit.record(command, result, state)
        self.metrics.on_applied(command, result, state)
        if not result.get("ok"):
            return
        if command.get("op") in ("genesis", "round_commit"):
            digest = command.get("version")
            if isinstance(digest, str) and not self.blobs.has(digest):
                self._missing_blobs.add(digest)
                self._fetch_wakeup.set()
        if command.get("op") in ("round_open", "round_abort", "round_commit", "claim", "revoke"):
            with self.tasks_changed:
                self.tasks_changed.notify_all()

    def _fetch_loop(self) -> None:
        """Followers pull committed blobs they lack (after a restart, say) from peers."""
        versions = self.replica.state.read(lambda s: [v["hash"] for v in s["versions"]])
        self._missing_blobs.update(h for h in versions if not self.blobs.has(h))
        while not self._stopping.is_set():
            self._fetch_wakeup.wait(2.0)
            self._fetch_wakeup.clear()
            for digest in list(self._missing_blobs):
                if self.blobs.has(digest) or self.fetch_from_peers(digest):
                    self._missing_blobs.discard(digest)

    def fetch_from_peers(self, digest: str) -> bool:
        for peer in self.membership.peers():
            try:
                reply = self.peer(peer).call(wire.ADMIN_SERVICE, "GetBlob", {"hash": digest},
                                             timeout=10)
                if reply.get("ok"):
                    self.blobs.put(reply["data"], expected=digest)
                    return True
            except (grpc.RpcError, BlobError, KeyError):
                continue
        return False

    # ------------------------------------------------------------ peers

    def peer(self, address: NodeAddress) -> wire.Channel:
        ch = self._peer_channels.get(address.id)
        if ch is None:
            ch = rpc.channel(address.admin, self.identity)
            self._peer_channels[address.id] = ch
        return ch

    def leader_address(self) -> NodeAddress | None:
        leader = self.replica.leader()
        return self.membership.address(leader) if leader else None

    def replicate_blob(self, data: bytes, digest: str, timeout: float) -> list[str]:
        """Store locally, push to peers, return the ids of nodes that hold the blob."""
        self.blobs.put(data, expected=digest)
        holders = [self.id]

        def push(peer: NodeAddress) -> str | None:
            try:
                r = self.peer(peer).call(wire.ADMIN_SERVICE, "PutBlob", {"data": data},
                                         timeout=timeout)
                return peer.id if r.get("ok") and r.get("hash") == digest else None
            except grpc.RpcError:
                return None

        pending = {self._pool.submit(push, p) for p in self.membership.peers()}
        need = sm.quorum(self.membership.cluster_size())
        deadline = time.monotonic() + timeout
        grace_until: float | None = None
        # Return once a quorum holds the blob (plus a short grace for the others), so an
        # unreachable peer costs the round nothing; its push goes on in the background.
        while pending:
            until = deadline if grace_until is None else min(deadline, grace_until)
            done, pending = concurrent.futures.wait(
                pending, timeout=max(0.0, until - time.monotonic()),
                return_when=concurrent.futures.FIRST_COMPLETED)
            for f in done:
                got = f.result() if f.exception() is None else None
                if got:
                    holders.append(got)
            if len(holders) >= need and grace_until is None:
                grace_until = time.monotonic() + 0.2
            if time.monotonic() >= until:
                break
        return holders

    # ------------------------------------------------------------ fleet API (sites)

    def _authenticate(self, msg: dict[str, Any], caller: rpc.Caller) -> str:
        site = msg.get("site")
        if not isinstance(site, str):
            raise wire.WireError("malformed", "request names no site")
        rec = self.replica.state.read(lambda s: s["sites"].get(site))
        if rec is None:
            raise wire.WireError("unenrolled", f"site {site!r} is not enrolled in this federation")
        if rec["revoked"]:
            raise wire.WireError("revoked", f"site {site!r} has been revoked")
        wire.verify_signature(msg, rec["public_key"], time.time())
        return site

    def _redirect(self) -> dict[str, Any]:
        leader = self.leader_address()
        return {"ok": True, "status": "redirect", "leader": leader.fleet if leader else None}

    def fleet_poll(self, msg: dict[str, Any], caller: rpc.Caller) -> dict[str, Any]:
        site = self._authenticate(msg, caller)
        wait = msg.get("wait", 0.0)
        wait = min(float(wait), wire.POLL_WAIT_MAX_S) if isinstance(wait, int | float) else 0.0
        deadline = time.monotonic() + max(0.0, wait)
        ledger: list[dict[str, Any]] | None = None
        while True:
            if not self.replica.is_leader():
                return self._redirect()
            if ledger is None:  # before `touch`: a site online has its late runs queued
                ledger = self.driver.settle(site, msg.get("unsettled"))
            self.online.touch(site)
            task = self.driver.task_for(site)
            if task is not None:
                return {"ok": True, "status": "task", "task": task, "ledger": ledger}
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping.is_set():
                return {"ok": True, "status": "idle", "ledger": ledger}
            with self.tasks_changed:
                self.tasks_changed.wait(min(left, 1.0))

    def fleet_get_blob(self, msg: dict[str, Any], caller: rpc.Caller) -> dict[str, Any]:
        self._authenticate(msg, caller)
        return self._get_blob(msg)

    def fleet_submit(self, msg: dict[str, Any], caller: rpc.Caller) -> dict[str, Any]:
        site = self._authenticate(msg, caller)
        if not self.replica.is_leader():
            return self._redirect() | {"ok": False, "code": "not_leader",
                                       "error": "this node is not the leader"}
        ledger = self.driver.settle(site, msg.get("unsettled"))
        return self.driver.accept_update(site, msg) | {"ledger": ledger}

    # ------------------------------------------------------------ admin API (CLI, peers)

    def _get_blob(self, msg: dict[str, Any]) -> dict[str, Any]:
        digest = msg.get("hash")
        if not isinstance(digest, str):
            return wire.error("malformed", "hash required")
        try:
            return {"ok": True, "data": self.blobs.get(digest)}
        except BlobError as exc:
            return wire.error("not_found", str(exc))

    def admin_get_blob(self, msg: dict[str, Any], caller: rpc.Caller) -> dict[str, Any]:
        return self._get_blob(msg)

    def admin_put_blob(self, msg: dict[str, Any], caller: rpc.Caller) -> dict[str, Any]:
        data = msg.get("data")
        if not isinstance(data, bytes):
            return wire.error("malformed", "data must be bytes")
        return {"ok": True, "hash": self.blobs.put(data)}

    def _submit(self, command: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        try:
            return self.replica.submit(command, timeout=rpc.time_left(timeout))
        except CommandFailed as exc:
            return wire.error("unavailable", str(exc))

    def admin_status(self, msg: dict[str, Any], caller: rpc.Caller) -> dict[str, Any]:
        raft = self.replica.status()
        view = self.replica.state.read(lambda s: {
            "fence_term": s["fence_term"], "leader_node": s["leader"],
            "leader_changes": max(0, len(s["leader_history"]) - 1),
            "sites": len(s["sites"]), "versions": len(s["versions"]),
            "last_round": sm.last_round(s), "target_round": s["training"]["target_round"],
        })
        leader = self.leader_address()
        return {
            "ok": True, "node": self.id, "raft": raft, "state": view,
            "leader": leader.id if leader else None,
            "leader_admin": leader.admin if leader else None,
            "nodes": self.membership.nodes(),
            "self": {"id": self.id, "raft": self.config.self_addr.raft,
                     "fleet": self.config.self_addr.fleet, "admin": self.config.self_addr.admin},
            "clients_online": sorted(self.online.online()) if self.replica.is_leader() else None,
        }

    def admin_sites(self, msg: dict[str, Any], caller: rpc.Caller) -> dict[str, Any]:
        sites = self.replica.state.read(lambda s: s["sites"])
        online = self.online.online() if self.replica.is_leader() else set()
        return {"ok": True, "leader": self.replica.is_leader(), "sites": [
            {"site": k, "public_key": v["public_key"], "revoked": v["revoked"],
             "online": k in online, "budget": v["budget"], "spent": v["spent"],
             "charges": v["charges"]}
            for k, v in sorted(sites.items())]}

    def admin_enroll(self, msg: dict[str, Any], caller: rpc.Caller) -> dict[str, Any]:
        key = msg.get("public_key")
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(key))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return wire.error("malformed", "public_key must be a 32-byte Ed25519 key in hex")
        command = {"op": "enroll", "site": msg.get("site"), "public_key": key.lower(),
                   "request_id": msg.get("request_id")}
        for budget in ("epsilon", "delta"):
            if budget in msg:
                command[budget] = msg[budget]
        return self._submit(command)

    def admin_set_budget(self, msg: dict[str, Any], caller: rpc.Caller) -> dict[str, Any]:
        """Change a site's privacy budget; the state machine checks it against the spend.

        The operator's certificate name goes into the command, so the audit log says who.
        """
        command = {"op": "set_budget", "site": msg.get("site"), "epsilon": msg.get("epsilon"),
                   "operator": caller.name, "request_id": msg.get("request_id")}
        if msg.get("delta") is not None:
            command["delta"] = msg["delta"]
        return self._submit(command)

    def admin_revoke(self, msg: dict[str, Any], caller: rpc.Caller) -> dict[str, Any]:
        return self._submit({"op": "revoke", "site": msg.get("site"),
                             "request_id": msg.get("request_id")})

    def admin_init_model(self, msg: dict[str, Any], caller: rpc.Caller) -> dict[str, Any]:
        data = msg.get("data")
        if not isinstance(data, bytes):
            return wire.error("malformed", "data must be the model's safetensors bytes")
        params = wire.decode_model(data)
        if not params:
            return wire.error("malformed", "the model has no tensors")
        digest = wire.sha256_hex(data)
        genesis = self.replica.state.read(lambda s: s["versions"][0]["hash"] if s["versions"] else None)
        if genesis not in (None, digest):  # refused before any blob is written or pushed
            return wire.error("exists", "the cluster already has a genesis model")
        holders = self.replicate_blob(data, digest, timeout=15.0)
        return self._submit({"op": "genesis", "version": digest, "size": len(data),
                             "holders": holders, "cluster_size": self.membership.cluster_size(),
                             "request_id": msg.get("request_id")})

    def admin_train(self, msg: dict[str, Any], caller: rpc.Caller) -> dict[str, Any]:
        return self._submit({"op": "train", "rounds": msg.get("rounds"),
                             "config": msg.get("config", {}),
                             "request_id": msg.get("request_id")})

    def admin_stop(self, msg: dict[str, Any], caller: rpc.Caller) -> dict[str, Any]:
        return self._submit({"op": "stop", "request_id": msg.get("request_id")})

    def admin_round_status(self, msg: dict[str, Any], caller: rpc.Caller) -> dict[str, Any]:
        view = self.replica.state.read(lambda s: {
            "last_round": sm.last_round(s),
            "target_round": s["training"]["target_round"],
            "config": s["training"]["config"],
            "open": s["round"],
            "versions": [{k: v[k] for k in ("round", "hash", "parent", "size")}
                         for v in s["versions"]],
            "history": {str(k): v for k, v in s["history"].items()},
            "leader_history": s["leader_history"],
        })
        view["progress"] = self.driver.progress() if self.replica.is_leader() else None
        return {"ok": True, "node": self.id, **view}
