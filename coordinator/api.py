"""The node's two gRPC APIs: the fleet API for sites and the admin API for operators,
auditors and peer nodes.

Each handler authenticates (the caller's role is checked before it runs, by `rpc`; a
site's request is also signed with its enrolled identity key), checks its message, and
delegates: writes become commands for the replicated state machine, round traffic goes
to the round driver, blobs to the blob service, membership changes to membership. No
handler keeps state of its own.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from coordinator import wire
from coordinator.cluster.blobs import BlobError, BlobService
from coordinator.cluster.config import ConfigError, NodeAddress, host_port
from coordinator.cluster.membership import Change, Membership
from coordinator.cluster.presence import OnlineSites, TaskBell
from coordinator.cluster.replica import CommandFailed, Replica
from coordinator.cluster.rpc import Caller, Handler, time_left
from coordinator.core import commands, site_pages
from coordinator.core.queries import Fresh, last_round, round_window, site_identity
from coordinator.round.driver import RoundDriver

ADMIN_READERS = frozenset({"operator", "node", "auditor"})
STATUS_BYTES = 48 * 1024
"""What one `RoundStatus` reply spends on rounds: a year of them must not reach gRPC's
message cap (`AdminClient.round_status` pages on)."""
AUDIT_PAGE = 200  # audit entries per `AuditEntries` reply
AUDIT_PAGE_BYTES = 8 << 20  # ... and their bytes (a round of 1,000 sites is ~100-250 kB)
STATUS_RUNS = 50  # the newest runs a status reply lists (`runs_total` counts them all)
STATUS_LEADERS = 50  # the newest leader changes it lists (`leader_changes` counts them all)


def _newest_runs(runs: dict[str, Any], also: str | None) -> list[dict[str, Any]]:
    """The newest `STATUS_RUNS` runs, and run `also` however old."""
    ids = list(runs)[-STATUS_RUNS:]
    if also in runs and also not in ids:
        ids.insert(0, also)
    return [runs[i] for i in ids]


def _packed_size(obj: Any) -> int:
    return len(wire.pack({"o": obj}))
OPERATOR_ONLY = frozenset({"operator"})  # people's decisions: no node makes them itself
NODE_ONLY = frozenset({"node"})
FLEET_CALLERS = frozenset({"client"})

DEFAULT_CHANGE_TIMEOUT_S = 20.0
MAX_CHANGE_TIMEOUT_S = 300.0
GENESIS_PUSH_TIMEOUT_S = 15.0

Reply = dict[str, Any]


@dataclass
class NodeApi:
    """The handlers of one node, over the services the node wires together."""

    self_addr: NodeAddress
    replica: Replica
    blobs: BlobService
    membership: Membership
    driver: RoundDriver
    online: OnlineSites
    bell: TaskBell
    stopping: threading.Event
    disk_full: Callable[[], str | None] = lambda: None  # why this node takes no writes now
    audit_damage: Callable[[], str | None] = lambda: None  # why its audit log stopped
    # entries of this node's audit log after a command, at most a count (as dicts)
    audit_entries: Callable[[int, int], list[dict[str, Any]]] = lambda _after, _limit: []
    _site_order: site_pages.SiteOrder = field(default_factory=site_pages.SiteOrder)

    def services(self) -> dict[str, dict[str, tuple[Handler, frozenset[str]]]]:
        """Every method of both APIs with the roles that may call it (for `rpc.make_server`)."""
        return {wire.FLEET_SERVICE: self.fleet_methods(), wire.ADMIN_SERVICE: self.admin_methods()}

    def fleet_methods(self) -> dict[str, tuple[Handler, frozenset[str]]]:
        return {"Poll": (self.fleet_poll, FLEET_CALLERS),
                "GetBlob": (self.fleet_get_blob, FLEET_CALLERS),
                "Submit": (self._writing(self.fleet_submit), FLEET_CALLERS)}

    def _writing(self, handler: Handler) -> Handler:
        """`handler`, refused with `disk_full` while this node's disk is full."""
        def guarded(msg: dict[str, Any], caller: Caller) -> Reply:
            reason = self.disk_full()
            if reason is not None:
                return wire.error("disk_full", f"node {self.self_addr.id} takes no work: {reason}")
            return handler(msg, caller)
        return guarded

    def admin_methods(self) -> dict[str, tuple[Handler, frozenset[str]]]:
        return {
            "Status": (self.admin_status, ADMIN_READERS),
            "Sites": (self.admin_sites, ADMIN_READERS),
            "RoundStatus": (self.admin_round_status, ADMIN_READERS),
            "AuditEntries": (self.admin_audit_entries, ADMIN_READERS),
            "GetBlob": (self.admin_get_blob, ADMIN_READERS),
            "Enroll": (self._writing(self.admin_enroll), OPERATOR_ONLY),
            "Revoke": (self._writing(self.admin_revoke), OPERATOR_ONLY),
            "SetBudget": (self._writing(self.admin_set_budget), OPERATOR_ONLY),
            "InitModel": (self._writing(self.admin_init_model), OPERATOR_ONLY),
            "Train": (self._writing(self.admin_train), OPERATOR_ONLY),
            "Stop": (self.admin_stop, OPERATOR_ONLY),  # stopping must always be possible
            "PutBlob": (self._writing(self.admin_put_blob), NODE_ONLY),
            "AddNode": (self._writing(self.admin_add_node), OPERATOR_ONLY),
            "RemoveNode": (self._writing(self.admin_remove_node), OPERATOR_ONLY),
            "TransferLeader": (self.admin_transfer_leader, OPERATOR_ONLY),
        }

    # ------------------------------------------------------------ fleet API (sites)

    def _authenticate(self, msg: dict[str, Any]) -> str:
        site = msg.get("site")
        if not isinstance(site, str):
            raise wire.WireError("malformed", "request names no site")
        rec = self.replica.state.read(lambda s: site_identity(s, site))
        if rec is None:
            raise wire.WireError("unenrolled", f"site {site!r} is not enrolled in this federation")
        if rec[1]:
            raise wire.WireError("revoked", f"site {site!r} has been revoked")
        wire.verify_signature(msg, rec[0], time.time())
        return site

    def _redirect(self) -> Reply:
        leader = self.membership.leader_address()
        return {"ok": True, "status": "redirect", "leader": leader.fleet if leader else None}

    def _poll_start(self, msg: dict[str, Any]) -> tuple[str, float, list[dict[str, Any]] | None]:
        """(site, deadline, ledger answers) of a Poll: the site authenticated and, on the
        leader, its late runs queued before it counts as online."""
        site = self._authenticate(msg)
        wait = msg.get("wait", 0.0)
        wait = min(float(wait), wire.POLL_WAIT_MAX_S) if isinstance(wait, int | float) else 0.0
        ledger = self.driver.settle(site, msg.get("unsettled")) if self.replica.is_leader() else None
        return site, time.monotonic() + max(0.0, wait), ledger

    def _poll_answer(self, site: str, deadline: float,
                     ledger: list[dict[str, Any]] | None) -> Reply | None:
        """The Poll's reply now (a redirect, the site's task, or idle at the deadline), or
        None to wait for the bell."""
        if not self.replica.is_leader():
            return self._redirect()
        if ledger is None:  # it became the leader while the site waited
            return {"ok": True, "status": "idle", "ledger": []}
        self.online.touch(site)
        task = self.driver.task_for(site)
        if task is not None:
            return {"ok": True, "status": "task", "task": task.to_wire(), "ledger": ledger}
        if time.monotonic() >= deadline or self.stopping.is_set():
            return {"ok": True, "status": "idle", "ledger": ledger}
        return None

    def fleet_poll(self, msg: dict[str, Any], caller: Caller) -> Reply:
        """Long poll: this site's task when there is one, else `idle` after `wait` seconds."""
        site, deadline, ledger = self._poll_start(msg)
        while (reply := self._poll_answer(site, deadline, ledger)) is None:
            self.bell.wait(min(deadline - time.monotonic(), 1.0))
        return reply

    async def fleet_poll_async(self, msg: dict[str, Any], caller: Caller) -> Reply:
        """`fleet_poll` on the fleet server's event loop: a waiting site holds no thread.
        Authentication and the ledger's answers run on its thread pool."""
        site, deadline, ledger = await asyncio.to_thread(self._poll_start, msg)
        while (reply := self._poll_answer(site, deadline, ledger)) is None:
            await self.bell.wait_async(min(deadline - time.monotonic(), 1.0))
        return reply

    def fleet_get_blob(self, msg: dict[str, Any], caller: Caller) -> Reply:
        self._authenticate(msg)
        return self._get_blob(msg)

    def fleet_submit(self, msg: dict[str, Any], caller: Caller) -> Reply:
        """A site's answer to one stage of the open round (its update or SecAgg+ message)."""
        site = self._authenticate(msg)
        if not self.replica.is_leader():
            return self._redirect() | wire.error("not_leader", "this node is not the leader")
        ledger = self.driver.settle(site, msg.get("unsettled"))
        try:
            reply = self.driver.accept(wire.Submit.from_wire(msg))
        except wire.WireError as exc:
            reply = exc.reply()
        return reply | {"ledger": ledger}

    # ------------------------------------------------------------ admin API: reads

    def _get_blob(self, msg: dict[str, Any]) -> Reply:
        digest = msg.get("hash")
        if not isinstance(digest, str):
            return wire.error("malformed", "hash required")
        try:
            return {"ok": True, "data": self.blobs.serve(digest)}
        except BlobError as exc:  # absent, or damaged (quarantined, being fetched again)
            return wire.error("not_found", str(exc))

    def admin_get_blob(self, msg: dict[str, Any], caller: Caller) -> Reply:
        return self._get_blob(msg)

    def admin_put_blob(self, msg: dict[str, Any], caller: Caller) -> Reply:
        data = msg.get("data")
        if not isinstance(data, bytes):
            return wire.error("malformed", "data must be bytes")
        return {"ok": True, "hash": self.blobs.store.put(data)}

    def _online(self) -> frozenset[str] | None:
        """The sites polling this node recently, where that is known: on the leader."""
        return frozenset(self.online.online()) if self.replica.is_leader() else None

    def admin_status(self, msg: dict[str, Any], caller: Caller) -> Reply:
        raft = self.replica.status()
        online = self._online()
        view = self.replica.state.read(lambda s: {
            "fence_term": s["fence_term"], "leader_node": s["leader"],
            "leader_changes": max(0, len(s["leader_history"]) - 1),
            "sites": len(s["sites"]), "versions": len(s["versions"]),
            "last_round": last_round(s), "target_round": s["training"]["target_round"],
            "audit_head": s.get("audit_head"),
        })
        leader = self.membership.leader_address()
        me = self.self_addr
        return {
            "ok": True, "node": me.id, "raft": raft, "state": view,
            "leader": leader.id if leader else None,
            "leader_admin": leader.admin if leader else None,
            "nodes": self.membership.nodes(),
            "self": {"id": me.id, "raft": me.raft, "fleet": me.fleet, "admin": me.admin},
            # a count and the first few ids: the whole list grows with the federation
            "clients_online": None if online is None else len(online),
            "clients_online_first": None if online is None else site_pages.first_online(online),
            "audit_damaged": self.audit_damage(),
        }

    def admin_sites(self, msg: dict[str, Any], caller: Caller) -> Reply:
        """A page of the enrolled sites (`site_pages`): chosen under the state's lock,
        and only its records copied."""
        query = site_pages.PageQuery.from_wire(msg)
        online = self._online()
        order = self._site_order

        def read(s: dict[str, Any]) -> Fresh[Reply]:
            return Fresh(site_pages.page(s, order.ids(s["sites"]), query, online))

        page = self.replica.state.read(read).value
        return {"ok": True, "leader": online is not None, **page}

    def admin_round_status(self, msg: dict[str, Any], caller: Caller) -> Reply:
        """The training state and a bounded window of rounds (`queries.round_window`):
        the newest by default, or onward from `from_round`; `rounds_end` is the newest
        round with anything to show, so a reader pages until `rounds_to` reaches it.
        Only the window is copied under the state's lock."""
        from_round, run_id = msg.get("from_round"), msg.get("run")
        if from_round is not None and (type(from_round) is not int or from_round < 0):
            return wire.error("malformed", "from_round must be an integer >= 0")
        if run_id is not None and not isinstance(run_id, str):
            return wire.error("malformed", "run must be a run id")

        def view_of(s: dict[str, Any]) -> dict[str, Any]:
            window = round_window(s, from_round, STATUS_BYTES, _packed_size)
            window["versions"] = [{k: v[k] for k in ("round", "hash", "parent", "size")}
                                  for v in window["versions"]]
            last = last_round(s)
            return {
                "last_round": last,
                "target_round": s["training"]["target_round"],
                "stopped": s["training"].get("stopped"),
                "config": s["training"]["config"],
                "run": s["training"].get("run"),
                "runs": _newest_runs(s.get("runs", {}), run_id),
                "runs_total": len(s.get("runs", {})),
                "open": s["round"],
                **window,
                "rounds_end": last + 1 if last + 1 in s["history"] else last,
                "history_kept_from": next(iter(s["history"]), None),
                "leader_history": s["leader_history"][-STATUS_LEADERS:],
                "leader_changes": max(0, len(s["leader_history"]) - 1),
            }

        view = self.replica.state.read(view_of)
        view["progress"] = self.driver.progress() if self.replica.is_leader() else None
        return {"ok": True, "node": self.self_addr.id, **view}

    def admin_audit_entries(self, msg: dict[str, Any], caller: Caller) -> Reply:
        """This node's audit entries for commands after `after` (at most `limit`, capped):
        a peer that took a snapshot copies the ones its journal no longer holds."""
        after, limit = msg.get("after"), msg.get("limit", AUDIT_PAGE)
        if type(after) is not int or after < 0:
            return wire.error("malformed", "after must be an integer >= 0")
        if type(limit) is not int or not 0 < limit <= AUDIT_PAGE:
            return wire.error("malformed", f"limit must be an integer in 1..{AUDIT_PAGE}")
        entries, used = [], 0
        for entry in self.audit_entries(after, limit):  # and at most AUDIT_PAGE_BYTES
            used += _packed_size(entry)
            if entries and used > AUDIT_PAGE_BYTES:
                break
            entries.append(entry)
        return {"ok": True, "entries": entries}

    # ------------------------------------------------------------ admin API: writes

    def _submit(self, command: dict[str, Any], timeout: float = 10.0) -> Reply:
        try:
            return self.replica.submit(command, timeout=time_left(timeout))
        except CommandFailed as exc:
            return wire.error("unavailable", str(exc))

    def admin_enroll(self, msg: dict[str, Any], caller: Caller) -> Reply:
        key = msg.get("public_key")
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(key))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return wire.error("malformed", "public_key must be a 32-byte Ed25519 key in hex")
        budget = {k: msg[k] for k in ("epsilon", "delta") if k in msg}
        return self._submit(commands.enroll(msg.get("site"), key.lower(),  # type: ignore[union-attr]
                                            budget=budget, operator=caller.name,
                                            request_id=msg.get("request_id")))

    def admin_set_budget(self, msg: dict[str, Any], caller: Caller) -> Reply:
        """Change a site's privacy budget; the state machine checks it against the spend.

        The operator's certificate name goes into the command, so the audit log says who.
        """
        return self._submit(commands.set_budget(
            msg.get("site"), msg.get("epsilon"), delta=msg.get("delta"), operator=caller.name,
            request_id=msg.get("request_id")))

    def admin_revoke(self, msg: dict[str, Any], caller: Caller) -> Reply:
        return self._submit(commands.revoke(msg.get("site"), operator=caller.name,
                                            request_id=msg.get("request_id")))

    def admin_init_model(self, msg: dict[str, Any], caller: Caller) -> Reply:
        data = msg.get("data")
        if not isinstance(data, bytes):
            return wire.error("malformed", "data must be the model's safetensors bytes")
        params = wire.decode_model(data)
        if not params:
            return wire.error("malformed", "the model has no tensors")
        digest = wire.sha256_hex(data)
        fresh = msg.get("fresh") is True  # the first model of the next run
        genesis = self.replica.state.read(
            lambda s: s["versions"][0]["hash"] if s["versions"] else None)
        if not fresh and genesis not in (None, digest):  # refused before any blob is pushed
            return wire.error("exists", "the cluster already has a genesis model; a run that "
                              "starts from a new model uploads it with `fedraft run start --model`")
        holders = self.blobs.replicate(data, digest, timeout=GENESIS_PUSH_TIMEOUT_S)
        return self._submit(commands.genesis(digest, len(data), holders,
                                             self.membership.cluster_size(), fresh=fresh,
                                             request_id=msg.get("request_id")))

    def admin_train(self, msg: dict[str, Any], caller: Caller) -> Reply:
        return self._submit(commands.train(msg.get("rounds"), msg.get("config", {}),
                                           run=msg.get("run"), task=msg.get("task"),
                                           operator=caller.name,
                                           request_id=msg.get("request_id")))

    def admin_stop(self, msg: dict[str, Any], caller: Caller) -> Reply:
        reason = msg.get("reason")
        return self._submit(commands.stop(reason=reason if isinstance(reason, str) else None,
                                          run=msg.get("run"), operator=caller.name,
                                          request_id=msg.get("request_id")))

    # ------------------------------------------------------------ admin API: membership

    def admin_add_node(self, msg: dict[str, Any], caller: Caller) -> Reply:
        """Add a running node, started with every member and itself as its peers."""
        raft = _address(msg.get("node"), "node")
        admin = None if msg.get("admin") is None else _address(msg.get("admin"), "admin")
        return self.membership.add(raft, admin, _timeout(msg), _change(msg, caller))

    def admin_remove_node(self, msg: dict[str, Any], caller: Caller) -> Reply:
        """Remove a member other than the leader (the CLI transfers leadership first)."""
        name = msg.get("node")
        if not isinstance(name, str) or not name:
            raise wire.WireError("malformed", "node must be a member's host:port or id")
        return self.membership.remove(name, _timeout(msg), _change(msg, caller))

    def admin_transfer_leader(self, msg: dict[str, Any], caller: Caller) -> Reply:
        """Hand leadership to the named member, or to the most caught-up one."""
        name = msg.get("node")
        if name is not None and (not isinstance(name, str) or not name):
            raise wire.WireError("malformed", "node must be a member's host:port or id")
        return self.membership.transfer(name, _timeout(msg), _change(msg, caller))


def _timeout(msg: dict[str, Any]) -> float:
    value = msg.get("timeout_s", DEFAULT_CHANGE_TIMEOUT_S)
    if not wire.is_number(value) or not 0 < value <= MAX_CHANGE_TIMEOUT_S:
        raise wire.WireError("malformed", f"timeout_s must be in (0, {MAX_CHANGE_TIMEOUT_S:g}]")
    return float(value)


def _address(value: Any, what: str) -> str:
    try:
        return host_port(value, what)
    except ConfigError as exc:
        raise wire.WireError("malformed", str(exc)) from None


def _change(msg: dict[str, Any], caller: Caller) -> Change:
    request = msg.get("request_id")
    return Change(operator=caller.name, request_id=request if isinstance(request, str) else None)
