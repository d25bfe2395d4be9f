"""Cluster membership: who the members are, where to reach them, and the operator's
changes to it (add a node, remove a node, hand leadership over), one at a time.

Raft membership lives in pysyncobj (dynamic membership change, applied by each node
when it appends the change's entry), so quorums follow `Replica.members()`, never the
static config a node started with. pysyncobj knows members only by Raft address; the
fleet and admin endpoints of a node added at runtime come from the replicated
`membership` record the leader commits after each change, which also puts a
`membership_changed` entry into every node's audit log.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from coordinator import wire
from coordinator.cluster import pki, rpc
from coordinator.cluster.config import ConfigError, NodeAddress, NodeConfig, host_port
from coordinator.cluster.replica import CommandFailed, MembershipError, Replica
from coordinator.core import commands

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Change:
    """Who asked for a membership change, and the request id that makes its record apply once."""

    operator: str
    request_id: str | None = None


class Membership:
    """The node's view of the membership, and the changes to it (one at a time)."""

    def __init__(self, replica: Replica, config: NodeConfig, identity: pki.Identity) -> None:
        self.replica = replica
        self.config = config
        self.identity = identity
        self._lock = threading.Lock()  # one change at a time (pysyncobj does not enforce it)
        self._current = ""

    # ------------------------------------------------------------ who and where

    def book(self) -> dict[str, NodeAddress]:
        """Raft address -> endpoints: the static config, overlaid by the replicated record."""
        book = {n.raft: n for n in self.config.all_nodes}
        for m in self.replica.state.read(lambda s: s.get("members")) or []:
            book[m["raft"]] = NodeAddress(m["id"], m["raft"], m["fleet"], m["admin"])
        return book

    def address(self, raft: str) -> NodeAddress | None:
        return self.book().get(raft)

    def leader_address(self) -> NodeAddress | None:
        """Where the current leader is, as far as this node knows."""
        leader = self.replica.leader()
        return self.address(leader) if leader else None

    def live(self) -> list[str]:
        """Raft addresses of the current members, this node included."""
        return self.replica.members()

    def cluster_size(self) -> int:
        """The member count quorums are taken over (blob holders, like Raft's own)."""
        return len(self.live())

    def peers(self) -> list[NodeAddress]:
        """The other members whose endpoints are known: blob push and fetch go to these."""
        book = self.book()
        me = self.config.self_addr.raft
        return [book[r] for r in self.live() if r != me and r in book]

    def nodes(self) -> list[dict[str, Any]]:
        """Every member with its endpoints (None where not yet recorded), for Status."""
        book = self.book()
        out = []
        for r in self.live():
            n = book.get(r)
            out.append(dataclasses.asdict(n) if n else
                       {"id": r, "raft": r, "fleet": None, "admin": None})
        return out

    def resolve(self, name: str) -> str | None:
        """A member's Raft address from its id or Raft address; None if not a member."""
        live = self.live()
        if name in live:
            return name
        book = self.book()
        return next((r for r in live if r in book and book[r].id == name), None)

    # ------------------------------------------------------------ the changes

    def add(self, raft: str, admin: str | None, timeout: float, who: Change) -> dict[str, Any]:
        """Add a running node, started with every member and itself as its peers."""
        return self._guarded(f"add {raft}", lambda: self._add(raft, admin, timeout, who))

    def remove(self, name: str, timeout: float, who: Change) -> dict[str, Any]:
        """Remove a member other than the leader (the CLI transfers leadership first)."""
        return self._guarded(f"remove {name}", lambda: self._remove(name, timeout, who))

    def transfer(self, name: str | None, timeout: float, who: Change) -> dict[str, Any]:
        """Hand leadership to the named member, or to the most caught-up one."""
        return self._guarded(f"transfer to {name or 'any member'}",
                             lambda: self._transfer(name, timeout, who))

    def _guarded(self, what: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if not self.replica.is_leader():
            leader = self.leader_address()
            return wire.error("not_leader", "membership changes run on the leader",
                              leader_admin=leader.admin if leader else None)
        if not self._lock.acquire(blocking=False):
            return wire.error("change_in_progress",
                              f"another membership change is in progress ({self._current}); "
                              "changes run one at a time, retry when it is done")
        self._current = what
        try:
            return work()
        except MembershipError as exc:
            return exc.reply()
        finally:
            self._current = ""
            self._lock.release()

    def _add(self, raft: str, admin: str | None, timeout: float, who: Change) -> dict[str, Any]:
        start = time.monotonic()
        deadline = start + timeout
        live = self.live()
        if raft in live:
            return wire.error("already_member", f"{raft} is already a member")
        known = self.book().get(raft)
        admin = admin or (known.admin if known else None)
        if admin is None:
            return wire.error("need_admin", f"no admin endpoint is known for {raft}: give the "
                              "new node's admin host:port (--node-admin)")
        new = self._probe(raft, admin, live, min(PROBE_TIMEOUT_S, timeout))
        if isinstance(new, dict):
            return new
        self.replica.change_membership("add", raft, max(0.5, deadline - time.monotonic()))
        log.info("membership: added %s (%s)", new.id, raft)
        members, recorded = self._record("add", raft, new.id, who, deadline, {raft: new})
        caught_up = self._wait_caught_up(raft, deadline)
        return {"ok": True, "change": "add", "node": raft, "node_id": new.id,
                "members": members, "recorded": recorded, "caught_up": caught_up,
                "seconds": round(time.monotonic() - start, 3)}

    def _probe(self, raft: str, admin: str, live: list[str],
               timeout: float) -> NodeAddress | dict[str, Any]:
        """Ask the new node who it is: it must answer, own `raft`, and list every member."""
        ch = rpc.channel(admin, self.identity)
        try:
            reply = ch.call(wire.ADMIN_SERVICE, "Status", {}, timeout=timeout)
        except grpc.RpcError as exc:
            return wire.error("unreachable_node", f"the new node's admin endpoint {admin} did "
                              f"not answer ({exc.code().name}); start the node first")
        finally:
            ch.close()
        me = reply.get("self") if reply.get("ok") else None
        if not isinstance(me, dict) or me.get("raft") != raft:
            says = me.get("raft") if isinstance(me, dict) else None
            return wire.error("wrong_node", f"{admin} is not the node with Raft address {raft} "
                              f"(it reports {says!r})")
        try:
            new = NodeAddress(str(me["id"]), raft, host_port(me.get("fleet"), "fleet"),
                              host_port(me.get("admin"), "admin"))
        except (KeyError, ConfigError) as exc:
            return wire.error("wrong_node", f"{admin} reports a bad address: {exc}")
        book = self.book()
        if any(book[r].id == new.id for r in live if r in book):
            return wire.error("exists", f"node id {new.id!r} is already taken by a member")
        theirs = set((reply.get("raft") or {}).get("members") or [])
        missing = sorted(set(live) - theirs)
        if missing:
            return wire.error("peers_missing", f"{new.id} was not started with the full peer "
                              f"list: its [[peers]] lack {', '.join(missing)}; restart it with "
                              "every current member plus itself")
        return new

    def _remove(self, name: str, timeout: float, who: Change) -> dict[str, Any]:
        start = time.monotonic()
        deadline = start + timeout
        raft = self.resolve(name)
        if raft is None:
            return wire.error("unknown_node", f"{name} is not a member (members: "
                              f"{', '.join(self.live())}); nothing changed")
        if raft == self.config.self_addr.raft:
            return wire.error("is_leader", f"{self.config.self_addr.id} ({raft}) is the leader and cannot "
                              "remove itself: transfer leadership first (fedraft cluster "
                              "transfer-leader); remove-node does that unless --no-transfer")
        known = self.address(raft)
        node_id = known.id if known else raft
        self.replica.change_membership("remove", raft, max(0.5, deadline - time.monotonic()))
        log.info("membership: removed %s (%s)", node_id, raft)
        members, recorded = self._record("remove", raft, node_id, who, deadline)
        return {"ok": True, "change": "remove", "node": raft, "node_id": node_id,
                "members": members, "recorded": recorded,
                "seconds": round(time.monotonic() - start, 3)}

    def _transfer(self, name: str | None, timeout: float, who: Change) -> dict[str, Any]:
        start = time.monotonic()
        deadline = start + timeout
        me = self.config.self_addr.raft
        my_id = self.config.self_addr.id
        target = None
        if name is not None:
            target = self.resolve(name)
            if target is None:
                return wire.error("unknown_node", f"{name} is not a member (members: "
                                  f"{', '.join(self.live())}); nothing changed")
        if target == me:
            return {"ok": True, "change": "transfer", "changed": False, "leader": my_id,
                    "leader_raft": me, "leader_admin": self.config.self_addr.admin,
                    "previous": my_id, "seconds": 0.0}
        if len(self.live()) < 2:
            return wire.error("no_target", "a one-node cluster has no one to hand leadership to")
        new = self.replica.transfer_leadership(target, timeout)
        known = self.address(new)
        new_id = known.id if known else new
        log.info("membership: leadership handed to %s (%s)", new_id, new)
        members, recorded = self._record("transfer", new, new_id, who, deadline)
        if target is not None and new != target:
            return wire.error("other_leader", f"leadership moved to {new_id}, not to {name} "
                              "(another node won the election)", leader=new_id,
                              leader_admin=known.admin if known else None)
        return {"ok": True, "change": "transfer", "changed": True, "leader": new_id,
                "leader_raft": new, "leader_admin": known.admin if known else None,
                "previous": my_id, "members": members, "recorded": recorded,
                "seconds": round(time.monotonic() - start, 3)}

    def _record(self, change: str, raft: str, node_id: str, who: Change, deadline: float,
                extra: dict[str, NodeAddress] | None = None) -> tuple[list[str], bool]:
        """Commit the `membership` record of a change pysyncobj has made; returns the
        members and whether the record committed (the change stands either way)."""
        book = self.book() | (extra or {})
        live = self.live()
        unknown = [r for r in live if r not in book]
        if unknown:
            log.warning("membership record leaves out members with unknown endpoints: %s",
                        unknown)
        request = who.request_id or uuid.uuid4().hex
        command = commands.membership(
            change, raft, node_id, [dataclasses.asdict(book[r]) for r in live if r in book],
            who.operator, f"membership-{request}"[:128])
        try:
            r = self.replica.submit(command, timeout=max(2.0, deadline - time.monotonic()))
        except CommandFailed as exc:
            log.warning("membership %s %s made but not recorded: %s", change, raft, exc)
            return live, False
        if not r.get("ok"):
            log.warning("membership record refused: %s", r)
        return live, bool(r.get("ok"))

    def _wait_caught_up(self, raft: str, deadline: float) -> bool:
        """Wait until the new node holds everything committed so far (or the deadline)."""
        target = self.replica.status()["commit_index"]
        while time.monotonic() < deadline and self.replica.is_leader():
            got = self.replica.match_index(raft)
            if got is not None and got >= target:
                return True
            time.sleep(0.05)
        return False
