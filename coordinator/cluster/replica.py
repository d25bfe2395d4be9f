"""pysyncobj wiring around the pure state machine.

One replicated method, `apply_command(dict)`, so method ids never shift (pysyncobj
numbers replicated methods by sorted name). The replicated state lives in a
SyncObjConsumer created before the SyncObj, so the tick thread can never apply a
journaled command before the state exists. Settings follow shared/notes/pysyncobj.md:
password always set, batching off, journal and full dump together, compaction by
fedraft's own durable snapshots (`snapshot`), leader fallback close to the election
timeout.

What pysyncobj 0.3.17 does not do right for us is patched in `raft_patches`: journal
appends and the term/vote file are synced before they are acknowledged, followers
truncate their log only where a leader's entry conflicts (Raft 5.3), idle links are kept
alive, and a leader's hang-up starts an election at once.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer, replicated
from pysyncobj.config import FAIL_REASON
from pysyncobj.syncobj import SyncObjException
from pysyncobj.transport import TCPTransport

from coordinator import wire
from coordinator.cluster import snapshot
from coordinator.cluster.journal_check import check_raft_dir
from coordinator.cluster.raft_patches import (
    elect_soon_when_leader_hangs_up,
    hold_elections_until_led,
    keep_links_alive,
    make_journal_durable,
    pause_while,
    refuse_unbounded_terms,
    reserve_journal_space,
    truncate_only_on_conflict,
)
from coordinator.cluster.raft_tls import RaftTls, tls_transport
from coordinator.cluster.raft_transport import harden_transport
from coordinator.core import state as sm

log = logging.getLogger(__name__)

REJOIN_MARKER = "REJOIN"
"""Left in an emptied Raft directory by `fedraft node recover`: the node rejoins quietly."""

AppliedHook = Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], None]


@dataclass(frozen=True)
class AuditLink:
    """What compaction needs of the node's audit writer (`AuditWriter`)."""

    idle: Callable[[], bool] = lambda: True
    through: Callable[[], int] = lambda: 0
    snapshot_installed: Callable[[int], None] = lambda _audit_through: None


def wall_clock() -> str:
    """This node's UTC time, to the millisecond, as the audit log records it."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ReplicatedState(SyncObjConsumer):
    def __init__(self, on_applied: AppliedHook,
                 on_installed: Callable[[int], None] = lambda _audit_through: None) -> None:
        self._lock = threading.RLock()
        self._on_applied = on_applied
        self._on_installed = on_installed
        super().__init__()
        self.machine: dict[str, Any] = sm.initial_state()

    def install(self, snap: snapshot.Snapshot) -> None:
        """Replace the state with a snapshot's (this node's at start, or the leader's)."""
        with self._lock:
            self.machine = snap.machine
        self._on_installed(snap.audit_through)

    @replicated
    def apply_command(self, command: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            result = sm.apply(self.machine, command)
            view = self.machine
            try:
                self._on_applied(command, result, view)
            except Exception:  # a hook must never break replication
                log.exception("applied-command hook failed")
        return result

    def read(self, fn: Callable[[dict[str, Any]], Any]) -> Any:
        """Run a read-only query against a consistent snapshot of local state."""
        with self._lock:
            return copy.deepcopy(fn(self.machine))


class CommandFailed(Exception):
    """The cluster could not apply a command in time (no leader, no quorum)."""


class MembershipError(wire.CodedError):
    """A membership change or leadership transfer that did not happen; `code` says why."""


_FAIL_NAMES = {v: k.lower() for k, v in vars(FAIL_REASON).items() if k.isupper()}
PARTNER_PREFIX = "partner_node_status_server_"
MATCH_PREFIX = "match_idx_server_"
# refused before anything was appended: safe to ask again
_RETRYABLE = (FAIL_REASON.REQUEST_DENIED, FAIL_REASON.QUEUE_FULL, FAIL_REASON.MISSING_LEADER)


class Replica:
    def __init__(
        self,
        self_addr: str,
        peers: list[str],
        data_dir: Path,
        password: str,
        election: tuple[float, float],
        on_applied: AppliedHook,
        on_state_changed: Callable[[int, int], None] | None = None,
        join: bool = False,
        bind: str = "",
        paused: Callable[[], bool] = lambda: False,
        tls: RaftTls | None = None,
        node_id: str | None = None,
        compaction: snapshot.CompactionPolicy | None = None,
        audit: AuditLink | None = None,
    ) -> None:
        """`bind` is the host:port the Raft port listens on: only `self_addr` unless given
        (pysyncobj alone listens on every interface). While `paused()` (its disk is full)
        the replica takes no append, casts no vote and stands for no election. With `tls`
        every Raft connection is mutual TLS between node certificates (`raft_tls`).
        `node_id` is stamped on the commands this node submits (`submitted_by`), beside
        its wall-clock time (`time`): the audit log records both, the state ignores them.
        The journal is compacted by `compaction` (`snapshot`), never past what `audit`
        has written."""
        self.node_id = node_id
        self.compaction = compaction or snapshot.CompactionPolicy()
        self.audit = audit or AuditLink()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.state = ReplicatedState(on_applied, self.audit.snapshot_installed)
        conf = self._conf(data_dir, password, election, on_state_changed, bind or self_addr)
        self.self_addr = self_addr
        check_raft_dir(data_dir / "raft.journal")  # damage is named, never replayed
        snapshot.finish_compaction(data_dir)  # a trim a crash interrupted; a damaged snapshot
        snapshot.install_durable_rename()
        reserve_journal_space()  # a full disk is an error, not SIGBUS
        self.sync = SyncObj(self_addr, peers, conf, consumers=[self.state],
                            transportClass=tls_transport(tls) if tls else TCPTransport)
        make_journal_durable(self.sync)
        truncate_only_on_conflict(self.sync)
        keep_links_alive(self.sync, interval=election[1] / 4)
        elect_soon_when_leader_hangs_up(self.sync, spread=min(0.3, election[0] / 3))
        pause_while(self.sync, paused)
        refuse_unbounded_terms(self.sync)  # last: it runs first on every message
        harden_transport(self.sync)
        self._next_compaction = 0.0
        self.sync.addOnTickCallback(self._compact_when_due)
        marker = data_dir / REJOIN_MARKER
        if self._raw_status()["log_len"] > 1:
            marker.unlink(missing_ok=True)
        elif join or marker.exists():
            hold_elections_until_led(self.sync)
            log.info("joining a running cluster: no election until a leader calls")


    def _conf(self, data_dir: Path, password: str, election: tuple[float, float],
              on_state_changed: Callable[[int, int], None] | None, bind: str) -> SyncObjConf:
        """pysyncobj's settings (shared/notes/pysyncobj.md), snapshots through `snapshot`."""
        return SyncObjConf(
            password=password,
            appendEntriesUseBatch=False,
            raftMinTimeout=election[0],
            raftMaxTimeout=election[1],
            leaderFallbackTimeout=election[1],
            appendEntriesPeriod=min(0.1, election[0] / 4),
            # a member that restarts is dialled again within 0.25 s, not 1 s: a leader that
            # dies soon after would otherwise find its two survivors not yet linked, and
            # their election would wait for the link (bench_failover saw 2-3.6 s)
            connectionRetryTime=0.25,
            connectionTimeout=election[1],
            journalFile=str(data_dir / "raft.journal"),
            fullDumpFile=str(data_dir / snapshot.SNAPSHOT_NAME),
            # pysyncobj's own schedule is off: `_compact_when_due` forces each compaction,
            # through fedraft's durable snapshot files (`snapshot`)
            logCompactionMinEntries=2**62,
            logCompactionMinTime=2**62,
            serializer=snapshot.writer(lambda: self.state.machine, self.audit.through,
                                       self.state._lock),
            deserializer=snapshot.reader(self.state.install),
            dynamicMembershipChange=True,
            useFork=False,
            onStateChanged=on_state_changed,
            commandsWaitLeader=True,
            # a peer that comes back at a new address (a rescheduled pod) is found again
            # within seconds, not after pysyncobj's default 10-minute DNS cache
            dnsCacheTime=5.0,
            dnsFailCacheTime=2.0,
            bindAddress=bind,
        )

    # ------------------------------------------------------------ compaction

    def journal_size(self) -> tuple[int, int]:
        """(entries, bytes) of the Raft journal as it stands."""
        journal = self.sync._SyncObj__raftLog  # type: ignore[attr-defined]
        return len(journal), int(journal._FileJournal__currentOffset)

    def _followers_behind(self) -> bool:
        """On the leader: a follower has not yet got every entry a compaction would trim."""
        if not self.is_leader():
            return False
        applied = self.sync._SyncObj__raftLastApplied  # type: ignore[attr-defined]
        matches = self.sync._SyncObj__raftMatchIndex  # type: ignore[attr-defined]
        return any(matches.get(node, 0) < applied - 1 for node in self.sync.otherNodes)

    def _compact_when_due(self) -> None:
        """On the tick thread, between applies: snapshot now if `compaction` says so.
        pysyncobj trims the journal on its next tick, once the snapshot is durable."""
        entries, size = self.journal_size()
        policy = self.compaction
        if (entries < policy.entries and size < policy.soft_bytes) or \
                time.monotonic() < self._next_compaction:
            return
        if not snapshot.compaction_due(policy, entries, size, self.audit.idle(),
                                       self._followers_behind()):
            return
        self._next_compaction = time.monotonic() + 1.0  # a failed snapshot is not retried at once
        self.sync.forceLogCompaction()
        self.sync._SyncObj__tryLogCompaction()  # type: ignore[attr-defined]
        log.info("snapshot at %d journal entries (%d bytes)", entries, size,
                 extra={"event": "raft_snapshot"})

    # ------------------------------------------------------------ raft facts

    def is_leader(self) -> bool:
        return self.sync._isLeader()

    def leader(self) -> str | None:
        node = self.sync._getLeader()
        return None if node is None else str(node.id if hasattr(node, "id") else node)

    def term(self) -> int:
        return int(self.sync.raftCurrentTerm)

    def leader_term(self, timeout: float = 1.0) -> int | None:
        """The current term if this node leads in it, else None.

        Read on the Raft thread between ticks, so state and term belong together: a
        leader deposed by a higher term holds that term while still marked leader for a
        moment, and a claim of it would fence out the term's real leader (seen right
        after leadership transfers)."""
        box: list[int | None] = []
        try:
            self._on_tick_thread(
                lambda: box.append(self.term() if self.is_leader() else None), timeout)
        except MembershipError:
            return None
        return box[0] if box else None

    def status(self) -> dict[str, Any]:
        s = self._raw_status()
        return {
            "state": {0: "follower", 1: "candidate", 2: "leader"}.get(s["state"], str(s["state"])),
            "leader": None if s["leader"] is None else str(s["leader"].id),
            "term": s["raft_term"],
            "commit_index": s["commit_idx"],
            "last_applied": s["last_applied"],
            "has_quorum": s["has_quorum"],
            "log_len": s["log_len"],
            "members": self._members(s),
            "connected": sorted(k[len(PARTNER_PREFIX):] for k, v in s.items()
                                if k.startswith(PARTNER_PREFIX) and v == 2),
        }

    # ------------------------------------------------------------ membership

    def _raw_status(self) -> dict[str, Any]:
        """pysyncobj's status, read from a caller's thread: a set the tick thread is
        changing (a membership change being applied) can make one read fail; retry."""
        for _ in range(20):
            try:
                return self.sync.getStatus()
            except RuntimeError:
                time.sleep(0.001)
        return self.sync.getStatus()

    def _members(self, status: dict[str, Any]) -> list[str]:
        partners = (k[len(PARTNER_PREFIX):] for k in status if k.startswith(PARTNER_PREFIX))
        return sorted({self.self_addr, *partners})

    def members(self) -> list[str]:
        """Raft addresses of the live membership as this node sees it, itself included.

        pysyncobj applies a membership change when its entry is appended, so on the
        leader this is the configuration that decides quorums, not the static config
        the node started with."""
        return self._members(self._raw_status())

    def match_index(self, node: str) -> int | None:
        """How far `node` has replicated this leader's log (None: not a follower here)."""
        return self._raw_status().get(MATCH_PREFIX + node)

    def change_membership(self, change: str, node: str, timeout: float) -> None:
        """Add or remove one node (`change` is "add" or "remove") and wait for the
        change's own log entry to commit. Call it on the leader, one change at a time.

        A new leader refuses changes until its first entry has applied, so a refusal is
        retried until `timeout`; the caller checks the obvious refusals (already a
        member, the leader itself) first."""
        deadline = time.monotonic() + timeout
        call = {"add": self.sync.addNodeToCluster, "remove": self.sync.removeNodeFromCluster}
        last = "no attempt"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MembershipError("timeout", f"{change} {node}: not committed in "
                                      f"{timeout:g}s (last: {last})")
            if not self.is_leader():
                raise MembershipError("not_leader", "this node is no longer the leader")
            done = threading.Event()
            outcome: list[int] = []

            def callback(_result: Any, error: int, outcome: list[int] = outcome,
                         done: threading.Event = done) -> None:
                outcome.append(error)
                done.set()

            call[change](node, callback=callback)
            while not done.wait(min(0.2, max(0.0, deadline - time.monotonic()))):
                # appended but not committed yet: it may still commit, even under another leader
                if time.monotonic() >= deadline or not self.is_leader():
                    raise MembershipError(
                        "timeout" if self.is_leader() else "leader_changed",
                        f"{change} {node}: not committed in time; it may still take effect "
                        "(check `fedraft cluster status` before retrying)")
            if outcome[0] == FAIL_REASON.SUCCESS:
                return
            if outcome[0] not in _RETRYABLE:  # appended, then lost with the lead
                raise MembershipError("leader_changed", f"{change} {node}: "
                                      f"{_FAIL_NAMES.get(outcome[0], outcome[0])}; check "
                                      "`fedraft cluster status` and retry")
            last = _FAIL_NAMES.get(outcome[0], str(outcome[0]))
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def transfer_leadership(self, node: str | None, timeout: float) -> str:
        """Hand leadership to `node` (None: the most caught-up follower) and wait until
        another node leads; returns its Raft address.

        pysyncobj's transfer sends a message, so it runs on the tick thread (its
        transport is not thread-safe). A target that is not fully caught up is refused
        by pysyncobj; that is retried until `timeout`, as is a target that lost the
        election it was told to start."""
        deadline = time.monotonic() + timeout
        last = "no attempt"
        while time.monotonic() < deadline:
            if not self.is_leader():
                current = self.leader()
                if current is not None and current != self.self_addr:
                    return current  # the caller tells whether the named target won
                time.sleep(0.02)
                continue
            outcome = self._send_transfer(node, max(0.0, deadline - time.monotonic()))
            if outcome != FAIL_REASON.SUCCESS:
                last = _FAIL_NAMES.get(outcome, str(outcome))
                time.sleep(0.05)
                continue
            last = "sent; the target has not taken over yet"
            wait_until = min(deadline, time.monotonic() + 1.0)
            while time.monotonic() < wait_until and self.is_leader():
                time.sleep(0.02)
        raise MembershipError("timeout", f"leadership not transferred in {timeout:g}s ({last})")

    def _send_transfer(self, node: str | None, timeout: float) -> int:
        outcome: list[int] = []
        self._on_tick_thread(lambda: self.sync.transferLeadership(
            node, callback=lambda _result, error: outcome.append(error)), timeout)
        return outcome[0] if outcome else FAIL_REASON.SUCCESS

    def _on_tick_thread(self, fn: Callable[[], None], timeout: float) -> None:
        """Run `fn` once on pysyncobj's tick thread and wait for it."""
        done = threading.Event()

        def once() -> None:  # the tick thread holds the callbacks' lock: never remove here
            if not done.is_set():
                try:
                    fn()
                finally:
                    done.set()

        self.sync.addOnTickCallback(once)
        try:
            if not done.wait(timeout):
                raise MembershipError("timeout", "the Raft thread did not run the request")
        finally:
            self.sync.removeOnTickCallback(once)

    # ------------------------------------------------------------ writes

    def submit(self, command: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Apply `command` through Raft, retrying across leader changes.

        A timeout does not mean "not applied", so every command gets a request id
        and the state machine returns the first result to any retry.
        """
        command = dict(command)
        command.setdefault("request_id", uuid.uuid4().hex)
        # when and where the command was asked for, for the audit log (never for apply)
        command.setdefault("time", wall_clock())
        if self.node_id is not None:
            command.setdefault("submitted_by", self.node_id)
        # The term this node knows, kept across timeouts: a copy that sits queued on a
        # cut-off leader keeps the old term and is refused once a newer leader claimed.
        command["submitted_term"] = self.term()
        deadline = time.monotonic() + timeout
        last_error = "no attempt"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CommandFailed(f"command {command['op']} not applied: {last_error}")
            try:
                # a copy per attempt: pysyncobj may hold a timed-out attempt's object in
                # its queue, and it must keep the term it was sent with
                result = self.state.apply_command(dict(command), sync=True,
                                                  timeout=min(left, 3.0))
            except SyncObjException as exc:
                last_error = str(exc.errorCode)
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                continue
            if result.get("code") != "stale_submission":
                return result
            # refused unapplied: this node has applied the newer claim by now
            last_error = "stale_submission"
            command["submitted_term"] = max(self.term(), command["submitted_term"] + 1)

    def destroy(self) -> None:
        self.sync.destroy()
