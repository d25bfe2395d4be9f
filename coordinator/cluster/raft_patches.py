"""What fedraft changes in pysyncobj 0.3.17 (pinned), in one place.

Each patch reaches into pysyncobj's private attributes, checks that they are where it
expects them (raising at start if a new pysyncobj moved them) and changes one behaviour:

* `make_journal_durable`: the journal (mmap, never synced) and the term/vote file reach
  the disk before anything is acknowledged, and a compaction trims the journal by an
  atomic rewrite (`snapshot`), not by clearing and refilling it in place.
* `truncate_only_on_conflict`: a follower deletes log entries only where the leader's
  entry at the same index has another term (Raft, section 5.3); pysyncobj deleted every
  entry after a message's `prevLogIdx`, so a stale or repeated AppendEntries could drop
  entries the follower had already acknowledged or applied.
* `refuse_unbounded_terms`: a peer's term or index past `journal_check.MAX_TERM` is
  dropped before pysyncobj adopts it.
* `reserve_journal_space`, `pause_while`: a full disk fails an append with ENOSPC instead
  of SIGBUS, and a node whose disk is full takes no append or vote.
* `keep_links_alive`, `elect_soon_when_leader_hangs_up`, `hold_elections_until_led`:
  links between followers, fast elections after a crash, quiet joins.

The journal checksums themselves live in `journal_check`, the port's limits in
`raft_transport`.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pysyncobj import SyncObj
from pysyncobj.journal import ResizableFile
from pysyncobj.pickle import to_bytes

from coordinator import durable
from coordinator.cluster import snapshot
from coordinator.cluster.journal_check import MAX_TERM, META_SUM, JournalSums, meta_digest

log = logging.getLogger(__name__)


def _message_handler(sync: SyncObj) -> tuple[Any, Callable[[Any, Any], None]]:
    """pysyncobj 0.3.17's transport and the handler it gives each member's message, which
    the patches below wrap; raises if they moved."""
    transport = sync._SyncObj__transport  # type: ignore[attr-defined]
    handle = transport._onMessageReceivedCallback
    if handle is None:
        raise RuntimeError("pysyncobj internals moved: no message callback to guard")
    return transport, handle


KEEPALIVE = {"type": "fedraft_keepalive"}  # pysyncobj ignores message types it does not know


def keep_links_alive(sync: SyncObj, interval: float) -> None:
    """Send every other member a message pysyncobj ignores, every `interval` seconds.

    Followers never talk to each other, so pysyncobj drops their links after
    `connectionTimeout` without data and redials a second later: about half the time
    one follower cannot reach another. A candidate then misses votes; with four members
    most leadership transfers failed (the target reached only the old leader) and a
    leader's death costs extra election rounds. Runs on the tick thread, which owns the
    transport. Reaches into pysyncobj 0.3.17's transport and member set; raises if they
    moved."""
    transport = sync._SyncObj__transport  # type: ignore[attr-defined]
    if not isinstance(sync._SyncObj__otherNodes, set):  # type: ignore[attr-defined]
        raise RuntimeError("pysyncobj internals moved: no member set to keep alive")
    due = [0.0]

    def beat() -> None:
        now = time.monotonic()
        if now < due[0]:
            return
        due[0] = now + interval
        for node in list(sync._SyncObj__otherNodes):  # type: ignore[attr-defined]
            transport.send(node, KEEPALIVE)

    sync.addOnTickCallback(beat)


def hang_up_election_delay(
    self_address: str, member_addresses: Iterable[str], leader_address: str, spread: float, u: float
) -> float:
    """Seconds this follower waits before standing, once the leader's link has closed.

    Every follower hears the hang-up within the same millisecond. Had they all drawn
    from one window, two would often stand before either's vote request arrived and
    split the vote, and the retry waits out a full election timeout. So the survivors
    take turns by address: the first stands after ``spread / 3`` (about one heartbeat
    period, so a live leader whose link merely dropped gets a heartbeat through first),
    the next one ``spread`` later, and so on. The first's request reaches the others long
    before their turn and, when they vote for it, pushes their own deadlines back; if
    its log is behind they refuse, and the next in turn stands a term higher. ``u`` is a
    uniform draw in [0, 1) that jitters each turn by up to ``spread / 6``."""
    survivors = sorted(set(member_addresses) - {leader_address} | {self_address})
    return spread * (survivors.index(self_address) + 1 / 3 + u / 6)


def elect_soon_when_leader_hangs_up(sync: SyncObj, spread: float) -> None:
    """Stand for election soon after the leader's link closes (``hang_up_election_delay``).

    A crashed leader process (SIGKILL, OOM, a panic) has its sockets closed by its kernel,
    so the followers learn of the death at once; waiting out the full 1-2 s election
    timeout then only adds latency. Raft's safety never depends on timing, so an early
    election is safe. A leader that is merely cut off (partition, SIGSTOP, a dead
    machine) closes nothing and is still detected by the timeout; a live leader whose
    link dropped redials and its next heartbeat pushes the deadline back, as usual.
    Reaches into pysyncobj 0.3.17's transport callback and election deadline; raises if
    they moved."""
    attr = "_SyncObj__raftElectionDeadline"
    getattr(sync, attr)
    transport = sync._SyncObj__transport  # type: ignore[attr-defined]
    original = transport._onNodeDisconnectedCallback
    if original is None:
        raise RuntimeError("pysyncobj internals moved: no node-disconnected callback")

    def on_disconnected(node: Any) -> None:  # tick thread
        original(node)
        if sync._getLeader() == node and not sync._isLeader():
            delay = hang_up_election_delay(
                sync.selfNode.address,
                (n.address for n in sync.otherNodes),
                node.address,
                spread,
                random.random(),
            )
            setattr(sync, attr, min(getattr(sync, attr), time.monotonic() + delay))
            log.info("leader %s hung up: election in %.2f s", node, delay, extra={"event": "leader_hung_up"})

    transport.setOnNodeDisconnectedCallback(on_disconnected)


def hold_elections_until_led(sync: SyncObj) -> None:
    """Keep a node that joins a running cluster from starting elections until a leader
    has contacted it.

    Until the leader adds it, the members drop its connections, but pysyncobj counts it
    as connected for a moment after each dial and lets it stand for election: its term
    climbs, and once added its first reply deposes the leader (one needless election
    per added node). With an empty log it could never win anyway. It still votes.
    Reaches into pysyncobj 0.3.17's election deadline; raises if that moved."""
    attr = "_SyncObj__raftElectionDeadline"
    getattr(sync, attr)
    led = threading.Event()

    def hold() -> None:  # runs on the tick thread, after this tick's election check
        if led.is_set():
            return
        if sync._getLeader() is not None:
            led.set()
            return
        setattr(sync, attr, time.monotonic() + 3600.0)

    sync.addOnTickCallback(hold)


def make_journal_durable(sync: SyncObj) -> None:
    """Sync the Raft journal after every append and truncation, and the term/vote file,
    each with its checksum (`journal_check`), closed when pysyncobj closes its journal.

    pysyncobj 0.3.17 (pinned) keeps its journal in ``_SyncObj__raftLog``; appends and
    truncations reach the disk before the call returns, so before the follower's reply
    or the leader's count of its own copy. Raises if the pinned internals moved."""
    journal = sync._SyncObj__raftLog  # type: ignore[attr-defined]
    flush = journal.flush
    add, delete_from, clear = journal.add, journal.deleteEntriesFrom, journal.clear
    meta = journal._FileJournal__metaStorer  # the current term and vote: Raft needs them durable
    store = meta.storeMeta
    path = meta.getPath()
    sums = JournalSums(Path(path).with_name(Path(path).name.removesuffix(".meta") + ".sums"))
    sums.truncate(len(journal))  # sums of appends that died before their record was synced
    for command, idx, term in journal[len(sums):]:  # pysyncobj's first no-op; older journals
        sums.append(idx, term, to_bytes(command))
    sums.sync()

    def durable_add(command: Any, idx: int, term: int) -> None:
        try:
            add(command, idx, term)
        except BaseException:  # no space (see reserve_journal_space): nothing written or acked
            held = journal._FileJournal__journal
            if held and held[-1] == (command, idx, term):
                held.pop()  # pysyncobj keeps the entry in memory before it writes the file
            raise
        sums.append(idx, term, to_bytes(command))
        flush()
        sums.sync()

    def durable_delete_from(entry_from: int) -> None:
        delete_from(entry_from)
        flush()
        sums.truncate(entry_from)
        sums.sync()

    def durable_clear() -> None:
        clear()
        flush()
        sums.truncate(0)
        sums.sync()

    def durable_delete_to(entry_to: int) -> None:  # compaction, after the snapshot is durable
        flush()
        sums.sync()
        _trim_journal(journal, sums, entry_to)

    def destroy() -> None:  # on the tick thread, after its last write
        destroy_journal()
        sums.close()

    destroy_journal = journal._destroy
    journal.add = durable_add
    journal.deleteEntriesFrom = durable_delete_from
    journal.deleteEntriesTo = durable_delete_to
    journal.clear = durable_clear
    journal._destroy = destroy

    def durable_store(values: dict[str, Any]) -> None:
        values[META_SUM] = meta_digest(values)
        store(values)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        durable.fsync_dir(os.path.dirname(path) or ".")

    meta.storeMeta = durable_store


TRIM_FAILED_EXIT = 70  # a trim failed half-way: the node ends, its next start finishes it


def _trim_journal(journal: Any, sums: JournalSums, entry_to: int) -> None:
    """Drop the journal's first `entry_to` entries (a snapshot holds them) by an atomic
    rewrite of the file and its sums (`snapshot.trim_journal_file`), then point
    pysyncobj's journal at the new file."""
    held = journal._FileJournal__journal
    if not 0 < entry_to < len(held):
        return
    path = Path(journal._FileJournal__journalFile._ResizableFile__fileName)
    keep_from = held[entry_to][1]
    end = snapshot.trim_journal_file(path, keep_from)
    try:  # the old file is gone: from here on, a failure must not leave appends going to it
        old = journal._FileJournal__journalFile
        journal._FileJournal__journalFile = ResizableFile(str(path))
        old._destroy()
        journal._FileJournal__journal = held[entry_to:]
        journal._FileJournal__currentOffset = end
        snapshot.crash_point("journal trimmed, its sums not")
        snapshot.trim_sums_file(sums.path, keep_from)
        sums.reopen()
    except BaseException:
        log.critical("the journal trim failed after the journal was replaced; exiting, and "
                     "the next start completes it", exc_info=True,
                     extra={"event": "raft_trim_failed"})
        os._exit(TRIM_FAILED_EXIT)


# ---------------------------------------------------------------- follower truncation

Entry = tuple[Any, int, int]
"""A pysyncobj log entry: (command, index, term)."""


@dataclass(frozen=True)
class AppendPlan:
    """What a follower does with one AppendEntries, as Raft 5.3 says.

    Entries the follower already holds with the same term are skipped (`prev_idx` /
    `prev_term` move past them); `entries` are the ones still to append; `truncate_from`
    is the index of the first entry whose term conflicts (delete it and all after it), or
    None: then nothing is deleted, even if the follower holds more than the message."""

    prev_idx: int
    prev_term: int
    entries: list[Entry]
    truncate_from: int | None


def plan_append(prev_idx: int, prev_term: int, entries: Sequence[Entry],
                term_at: Callable[[int], int | None]) -> AppendPlan:
    """The follower's plan for an AppendEntries whose `prev_idx` entry it holds with
    `prev_term`; `term_at(i)` is the term of its entry at i, None past its log's end."""
    k = 0
    while k < len(entries) and term_at(entries[k][1]) == entries[k][2]:
        prev_idx, prev_term = entries[k][1], entries[k][2]
        k += 1
    rest = list(entries[k:])
    conflict = rest[0][1] if rest and term_at(rest[0][1]) is not None else None
    return AppendPlan(prev_idx, prev_term, rest, conflict)


def _misleading_truncation_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("truncating already-applied")


def _drop_pysyncobj_truncation_warning() -> None:
    """pysyncobj warns that it truncates applied entries before it calls the delete that
    `truncate_only_on_conflict` guards; with the guard, which refuses (and logs) any
    conflict at an applied entry, that delete never runs, so the warning would be false."""
    logger = logging.getLogger("pysyncobj.syncobj")
    if _misleading_truncation_warning not in logger.filters:
        logger.addFilter(_misleading_truncation_warning)


def truncate_only_on_conflict(sync: SyncObj) -> None:
    """Make a follower truncate its log only on a term conflict, never an entry it applied.

    pysyncobj's follower, given an AppendEntries whose `prevLogIdx` it holds, deletes every
    entry after it and appends the message's entries. A message that arrives late, or is
    sent again, with fewer entries than the follower already has would then drop entries
    it has acknowledged (the leader counted them towards a commit) or even applied (the
    issue that filed this saw 425 truncations of applied entries in 10,000 writes under
    load). Here each such message is first planned by `plan_append`: entries the follower
    holds are skipped, and pysyncobj's rollback and deletion run only from a conflicting
    entry. A conflict at an entry already applied would make this replica diverge: it is
    refused and logged instead, and the node does not acknowledge the message.
    Reaches into pysyncobj 0.3.17's log, transport callback and two private methods;
    raises if they moved."""
    journal = sync._SyncObj__raftLog  # type: ignore[attr-defined]
    transport, handle = _message_handler(sync)
    delete_from = sync._SyncObj__deleteEntriesFrom  # type: ignore[attr-defined]
    change_cluster = sync._SyncObj__doChangeCluster  # type: ignore[attr-defined]
    allowed: list[int | None] = [None]  # where the message being handled may truncate

    def term_at(index: int) -> int | None:
        first, last = journal[0][1], journal[-1][1]
        return journal[index - first][2] if first <= index <= last else None

    def on_message(node: Any, message: Any) -> None:  # tick thread
        allowed[0] = None
        if (isinstance(message, dict) and message.get("type") == "append_entries"
                and "prevLogIdx" in message and message.get("transmission") is None
                and term_at(message["prevLogIdx"]) == message.get("prevLogTerm")):
            plan = plan_append(message["prevLogIdx"], message["prevLogTerm"],
                               message.get("entries") or [], term_at)
            applied = sync._SyncObj__raftLastApplied  # type: ignore[attr-defined]
            if plan.truncate_from is not None and plan.truncate_from <= applied:
                log.critical("refused an AppendEntries from %s: its entry %d conflicts with an "
                             "entry this node has applied (applied up to %d); not truncating "
                             "it", node, plan.truncate_from, applied,
                             extra={"event": "raft_conflict_on_applied_entry"})
                return
            allowed[0] = plan.truncate_from
            message = {**message, "prevLogIdx": plan.prev_idx, "prevLogTerm": plan.prev_term,
                       "entries": plan.entries}
        try:
            handle(node, message)
        finally:
            allowed[0] = None

    def guarded_delete(from_idx: int) -> None:
        if allowed[0] is not None and from_idx >= allowed[0]:
            delete_from(from_idx)

    def guarded_change(request: Any, reverse: bool = False) -> Any:
        if reverse and allowed[0] is None:
            return None  # the entries stay, and so do the membership changes they hold
        return change_cluster(request, reverse)

    _drop_pysyncobj_truncation_warning()
    sync._SyncObj__deleteEntriesFrom = guarded_delete  # type: ignore[attr-defined]
    sync._SyncObj__doChangeCluster = guarded_change  # type: ignore[attr-defined]
    transport.setOnMessageReceivedCallback(on_message)


# ---------------------------------------------------------------- bounded terms and indices

BOUNDED_FIELDS = ("term", "prevLogIdx", "prevLogTerm", "commit_index", "next_node_idx",
                  "last_log_index", "last_log_term", "log_idx", "log_term")


def message_out_of_bounds(message: Any) -> str | None:
    """Why a peer's message carries a term or index no honest node sends, or None."""
    if not isinstance(message, dict):
        return None
    for key in BOUNDED_FIELDS:
        if key in message:
            value = message[key]
            if type(value) is not int or not 0 <= value <= MAX_TERM:
                return f"{key} {value!r} is out of bounds"
    entries = message.get("entries")
    if entries is not None:
        if not isinstance(entries, list):
            return "entries is not a list"
        for entry in entries:
            if not (isinstance(entry, tuple | list) and len(entry) == 3
                    and all(type(v) is int and 0 <= v <= MAX_TERM for v in entry[1:])):
                return "an entry's index or term is out of bounds"
    return None


def refuse_unbounded_terms(sync: SyncObj, log_every: float = 10.0) -> None:
    """Drop any message whose term or index is out of bounds, before pysyncobj reads it.

    A node whose term file was overwritten with 0xff announced a term past 2^64; every
    peer adopted it (a higher term always wins in Raft) and then could write neither its
    term file nor its journal: one damaged disk stopped the federation. Terms and
    indices are bounded by `journal_check.MAX_TERM` on disk and here on the wire. Logs
    one line per peer per `log_every` seconds. Install it after the other message
    patches, so that it runs first. Reaches into pysyncobj 0.3.17's transport callback."""
    transport, handle = _message_handler(sync)
    logged: dict[str, float] = {}

    def on_message(node: Any, message: Any) -> None:  # tick thread
        problem = message_out_of_bounds(message)
        if problem is None:
            handle(node, message)
            return
        now = time.monotonic()
        if now - logged.get(str(node), -log_every) >= log_every:
            logged[str(node)] = now
            log.warning("dropped a Raft message from %s: %s", node, problem,
                        extra={"event": "raft_message_out_of_bounds"})

    transport.setOnMessageReceivedCallback(on_message)


# ---------------------------------------------------------------- a full disk

_reserving = False


def reserve_journal_space() -> None:
    """Make pysyncobj's journal file claim its blocks before it maps them (every journal
    in the process).

    pysyncobj grows the file under its mmap with ftruncate, which allocates nothing: on a
    full disk the first write to a new page killed the node with SIGBUS. posix_fallocate
    first turns that into an OSError (ENOSPC) raised before anything is written, which
    `make_journal_durable` undoes in memory; the node does not acknowledge the entry.
    Reaches into pysyncobj 0.3.17's ResizableFile; raises if it moved."""
    global _reserving
    from pysyncobj.journal import ResizableFile

    if _reserving:
        return
    write = ResizableFile.write
    if not hasattr(ResizableFile, "_ResizableFile__extand"):
        raise RuntimeError("pysyncobj internals moved: no ResizableFile to reserve for")

    def reserving_write(self: Any, offset: int, values: bytes) -> None:
        mm, end = self._ResizableFile__mm, offset + len(values)
        size = mm.size()
        if end > size:
            grown = max(int(size * self._ResizableFile__resizeFactor), end)
            os.posix_fallocate(self._ResizableFile__f.fileno(), size, grown - size)
            mm.resize(grown)  # the file is that long now: map what was allocated
        write(self, offset, values)

    ResizableFile.write = reserving_write
    _reserving = True


def pause_while(sync: SyncObj, paused: Callable[[], bool]) -> None:
    """While `paused()` (the node's disk is full) take no Raft append and cast no vote,
    and stand for no election: each would need a write that cannot happen. The leader
    resends what this node did not acknowledge once it takes part again. Reaches into
    pysyncobj 0.3.17's transport callback and election deadline; raises if they moved."""
    attr = "_SyncObj__raftElectionDeadline"
    getattr(sync, attr)
    transport, handle = _message_handler(sync)

    def on_message(node: Any, message: Any) -> None:  # tick thread
        if (paused() and isinstance(message, dict)
                and message.get("type") in ("append_entries", "request_vote")):
            return
        handle(node, message)

    def hold() -> None:  # tick thread
        if paused() and not sync._isLeader():
            setattr(sync, attr, max(getattr(sync, attr), time.monotonic() + 1.0))

    transport.setOnMessageReceivedCallback(on_message)
    sync.addOnTickCallback(hold)
