"""pysyncobj wiring around the pure state machine.

One replicated method, `apply_command(dict)`, so method ids never shift (pysyncobj
numbers replicated methods by sorted name). The replicated state lives in a
SyncObjConsumer created before the SyncObj, so the tick thread can never apply a
journaled command before the state exists. Settings follow shared/notes/pysyncobj.md:
password always set, batching off, journal and full dump together, compaction
effectively off, leader fallback close to the election timeout.

Durability: pysyncobj writes its journal through mmap and never syncs it, so a SIGKILL
loses nothing (the page cache keeps it) but a power cut could lose entries a node has
already acknowledged. `make_journal_durable` syncs every append and truncation to disk
before pysyncobj goes on to acknowledge it (0.3 ms per entry measured here), and the
term/vote file with it.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer, replicated
from pysyncobj.syncobj import SyncObjException

from coordinator import state as sm

log = logging.getLogger(__name__)

AppliedHook = Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], None]


class ReplicatedState(SyncObjConsumer):
    def __init__(self, on_applied: AppliedHook) -> None:
        # Attributes set before super().__init__() are not part of the snapshot.
        self._lock = threading.RLock()
        self._on_applied = on_applied
        super().__init__()
        self.machine: dict[str, Any] = sm.initial_state()

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
    ) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        conf = SyncObjConf(
            password=password,
            appendEntriesUseBatch=False,
            raftMinTimeout=election[0],
            raftMaxTimeout=election[1],
            leaderFallbackTimeout=election[1],
            appendEntriesPeriod=min(0.1, election[0] / 4),
            connectionRetryTime=1.0,
            connectionTimeout=election[1],
            journalFile=str(data_dir / "raft.journal"),
            fullDumpFile=str(data_dir / "raft.dump"),
            logCompactionMinEntries=2**62,
            logCompactionMinTime=2**62,
            dynamicMembershipChange=True,
            useFork=False,
            onStateChanged=on_state_changed,
            commandsWaitLeader=True,
        )
        self.self_addr = self_addr
        self.state = ReplicatedState(on_applied)
        self.sync = SyncObj(self_addr, peers, conf, consumers=[self.state])
        make_journal_durable(self.sync)

    # ------------------------------------------------------------ raft facts

    def is_leader(self) -> bool:
        return self.sync._isLeader()

    def leader(self) -> str | None:
        node = self.sync._getLeader()
        return None if node is None else str(node.id if hasattr(node, "id") else node)

    def term(self) -> int:
        return int(self.sync.raftCurrentTerm)

    def status(self) -> dict[str, Any]:
        s = self.sync.getStatus()
        return {
            "state": {0: "follower", 1: "candidate", 2: "leader"}.get(s["state"], str(s["state"])),
            "leader": None if s["leader"] is None else str(s["leader"].id),
            "term": s["raft_term"],
            "commit_index": s["commit_idx"],
            "last_applied": s["last_applied"],
            "has_quorum": s["has_quorum"],
            "log_len": s["log_len"],
        }

    # ------------------------------------------------------------ writes

    def submit(self, command: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Apply `command` through Raft, retrying across leader changes.

        A timeout does not mean "not applied", so every command gets a request id
        and the state machine returns the first result to any retry.
        """
        command = dict(command)
        command.setdefault("request_id", uuid.uuid4().hex)
        deadline = time.monotonic() + timeout
        last_error = "no attempt"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CommandFailed(f"command {command['op']} not applied: {last_error}")
            try:
                return self.state.apply_command(command, sync=True, timeout=min(left, 3.0))
            except SyncObjException as exc:
                last_error = str(exc.errorCode)
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def destroy(self) -> None:
        self.sync.destroy()


def make_journal_durable(sync: SyncObj) -> None:
    """Sync the Raft journal after every append and truncation, and the term/vote file.

    pysyncobj 0.3.17 (pinned) keeps its journal in ``_SyncObj__raftLog``; appends and
    truncations reach the disk before the call returns, so before the follower's reply
    or the leader's count of its own copy. Raises if the pinned internals moved."""
    journal = sync._SyncObj__raftLog  # type: ignore[attr-defined]
    flush = journal.flush
    add, delete_from = journal.add, journal.deleteEntriesFrom

    def durable_add(command: Any, idx: int, term: int) -> None:
        add(command, idx, term)
        flush()

    def durable_delete_from(entry_from: int) -> None:
        delete_from(entry_from)
        flush()

    journal.add = durable_add
    journal.deleteEntriesFrom = durable_delete_from
    meta = journal._FileJournal__metaStorer  # the current term and vote: Raft needs them durable
    store = meta.storeMeta
    path = meta.getPath()

    def durable_store(values: dict[str, Any]) -> None:
        store(values)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    meta.storeMeta = durable_store
