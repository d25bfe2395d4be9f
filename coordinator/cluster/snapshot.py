"""Raft log compaction that cannot lose an acknowledged write.

pysyncobj 0.3.17's own compaction is unsafe: it writes its snapshot without fsync, then
trims the journal by clearing it and appending the tail again in place (a crash in
between keeps part of the tail), and a node that dies after its snapshot but before the
trim discards the whole journal tail on restart (4 of 15 kill -9 trials lost 100-141
acknowledged writes, shared/notes/pysyncobj.md). fedraft keeps pysyncobj's schedule and
its snapshot transfer to lagging followers, and replaces every step that touches a disk:

1. `writer`: the snapshot (the state machine, the two log entries it ends at, the
   membership) goes to pysyncobj's temporary file with a header and SHA-256, fsynced;
   `durable_rename` moves it into place and fsyncs the directory (also for a snapshot
   received from the leader).
2. Only then is the journal trimmed (`trim_journal_file`, `trim_sums_file`): the records
   from the snapshot's first entry on are copied to a new file, fsynced, renamed over the
   journal, the directory fsynced; the checksums file follows the same way.
3. `finish_compaction`, before pysyncobj reads the directory, completes a trim that a
   crash interrupted (a journal that still holds entries the snapshot covers), and
   `check_snapshot` names a damaged snapshot instead of serving from it.

A crash at any point leaves a snapshot and a journal that together hold every
acknowledged entry: the old snapshot with the untrimmed journal, the new snapshot with
the untrimmed journal (finished at start), or the new snapshot with the trimmed journal.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from pysyncobj.node import Node, TCPNode

from coordinator import durable
from coordinator.cluster.journal_check import (
    FIRST_RECORD_OFFSET,
    LAST_RECORD_OFFSET_AT,
    SUM_BYTES,
    JournalDamaged,
    scan,
)

MAGIC = b"FEDRAFT-SNAPSHOT-2\n"
HEADER = struct.Struct("<QQQQ32s")  # prev index, prev term, last index, last term, SHA-256
SNAPSHOT_NAME = "raft.dump"

Entry = tuple[Any, int, int]  # pysyncobj's (command, index, term)
log = logging.getLogger(__name__)

CRASH_POINTS_ENV = "FEDRAFT_TEST_CRASH_POINTS"
"""Tests only (`simulations/chaos.py --crash-points P`): at each step of a compaction the
node exits at once, with probability P, as a SIGKILL would end it (no cleanup).
`P@word` limits it to the steps whose description holds `word`."""
CRASH_EXIT = 75


def crash_point(step: str) -> None:
    """Die here with the probability `CRASH_POINTS_ENV` names (unset: never)."""
    spec = os.environ.get(CRASH_POINTS_ENV)
    if not spec:
        return
    chance, _, where = spec.partition("@")
    if where in step and random.random() < float(chance):
        print(f"crash point: exiting at {step}", file=sys.stderr, flush=True)
        os._exit(CRASH_EXIT)


@dataclass(frozen=True)
class Snapshot:
    """The replicated state as of log entry `last`; `prev` is the entry before it (the
    journal's first entry once trimmed) and `cluster` pysyncobj's member set."""

    machine: dict[str, Any]
    last: Entry
    prev: Entry
    cluster: Any
    audit_through: int = 0  # the writer's last audited command when it took the snapshot


def encode(snap: Snapshot) -> bytes:
    """The snapshot as bytes: msgpack of plain data only (the state machine holds dicts,
    lists, str, bytes, numbers, bool and None; anything else is refused, not guessed at),
    so reading one, ours or the leader's, never runs code the way unpickling can."""
    members = sorted(node.id if isinstance(node, Node) else str(node) for node in snap.cluster)
    body = msgpack.packb([snap.machine, list(snap.last), list(snap.prev), members,
                          snap.audit_through], use_bin_type=True, strict_types=True)
    head = HEADER.pack(snap.prev[1], snap.prev[2], snap.last[1], snap.last[2],
                       hashlib.sha256(body).digest())
    return MAGIC + head + body


def read_header(data: bytes) -> tuple[int, int, int, int]:
    """(prev index, prev term, last index, last term) of a snapshot's bytes, checked
    against its SHA-256; JournalDamaged if it is not a whole fedraft snapshot."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + HEADER.size:
        raise JournalDamaged("the snapshot raft.dump is not a fedraft snapshot (cut short or "
                             "overwritten)")
    *where, digest = HEADER.unpack_from(data, len(MAGIC))
    if hashlib.sha256(data[len(MAGIC) + HEADER.size:]).digest() != digest:
        raise JournalDamaged("the snapshot raft.dump does not match its checksum")
    return where[0], where[1], where[2], where[3]


def decode(data: bytes) -> Snapshot:
    read_header(data)
    try:
        machine, last, prev, members, audit_through = msgpack.unpackb(
            data[len(MAGIC) + HEADER.size:], raw=False, strict_map_key=False)
        cluster = {TCPNode(address) for address in members}
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise JournalDamaged(f"the snapshot raft.dump does not decode ({exc})") from None
    return Snapshot(machine, tuple(last), tuple(prev), cluster, audit_through)


def writer(machine: Callable[[], dict[str, Any]], audit_through: Callable[[], int],
           lock: Any) -> Callable[[str, tuple[Any, ...]], None]:
    """pysyncobj's `serializer` hook: it calls this on its Raft thread, between two
    applies, with the temporary file's name and (last entry, prev entry, members). The
    state is encoded under `lock`: readers may add an index to it meanwhile."""

    def write(tmp: str, data: tuple[Any, ...]) -> None:
        last, prev, cluster = data
        try:
            with lock:
                blob = encode(Snapshot(machine(), tuple(last), tuple(prev), cluster,
                                       audit_through()))
        except Exception:  # pysyncobj would only say "failed": name why, then retry later
            log.exception("snapshot not written", extra={"event": "raft_snapshot_failed"})
            raise
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        crash_point("snapshot written, not renamed")

    return write


def reader(install: Callable[[Snapshot], None]) -> Callable[[str], tuple[Any, ...]]:
    """pysyncobj's `deserializer` hook (at start, and when a follower receives the
    leader's snapshot): installs the state and gives pysyncobj its entries and members."""

    def read(path: str) -> tuple[Any, ...]:
        snap = decode(Path(path).read_bytes())
        install(snap)
        return snap.last, snap.prev, snap.cluster

    return read


def durable_rename(src: str, dst: str) -> None:
    """pysyncobj's `atomicReplace`, made durable: the file's bytes, then the rename."""
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(src, dst)
    durable.fsync_dir(os.path.dirname(dst) or ".")
    crash_point("snapshot in place, journal not trimmed")


def install_durable_rename() -> None:
    """Make pysyncobj's serializer use `durable_rename` (for every node in the process)."""
    import pysyncobj.serializer as serializer

    if not hasattr(serializer, "atomicReplace"):
        raise RuntimeError("pysyncobj internals moved: no atomicReplace in its serializer")
    serializer.atomicReplace = durable_rename


# ---------------------------------------------------------------- when to compact


@dataclass(frozen=True)
class CompactionPolicy:
    """When a node snapshots its state and trims its journal.

    Due at `entries` journal entries or `soft_bytes` of journal. It waits while this
    node's audit writer has entries to write (the trimmed commands could no longer rebuild
    them) and, on the leader, while a follower still needs entries it would trim (that
    follower would get the whole snapshot instead of the entries, and copy their audit
    entries from a peer). It waits for no follower once the journal reaches `hard_bytes` or
    `hard_factor` times `entries`: a node down for good must not grow the journal towards
    pysyncobj's 4 GiB offset limit, nor the leader's replay at its next start."""

    entries: int = 5_000
    soft_bytes: int = 64 << 20
    hard_bytes: int = 256 << 20
    hard_factor: int = 4


def compaction_due(policy: CompactionPolicy, entries: int, journal_bytes: int,
                   audit_idle: bool, followers_behind: bool) -> bool:
    """Whether to snapshot now (pure: the caller reads the journal and the followers)."""
    if entries < policy.entries and journal_bytes < policy.soft_bytes or not audit_idle:
        return False  # the journal still holds what rebuilds the audit log's missing tail
    hard = journal_bytes >= policy.hard_bytes or entries >= policy.hard_factor * policy.entries
    return hard or not followers_behind


# ---------------------------------------------------------------- trimming the files


def trim_journal_file(path: Path, keep_from: int) -> int:
    """Rewrite pysyncobj's journal at `path` to hold only the records from index
    `keep_from` on, atomically and durably; returns the new end offset. A journal that
    already starts there is left alone."""
    data = path.read_bytes()
    records = scan(data, digests=False)  # on the Raft thread: the framing, not the hashes
    at = next((i for i, r in enumerate(records) if r.index == keep_from), None)
    end = struct.unpack_from("<I", data, LAST_RECORD_OFFSET_AT)[0]
    if at is None:
        raise JournalDamaged(f"the journal holds no entry {keep_from} to trim to")
    if at == 0:
        return end
    start = records[at].offset
    new_end = FIRST_RECORD_OFFSET + end - start
    header = data[:LAST_RECORD_OFFSET_AT] + struct.pack("<I", new_end)
    durable.write_atomic(path, [header, data[start:end]], mode=0o600)
    return new_end


def trim_sums_file(path: Path, keep_from: int) -> None:
    """Rewrite the checksums file to start at the sum of entry `keep_from`."""
    data = path.read_bytes()
    data = data[: len(data) - len(data) % SUM_BYTES]
    for i in range(len(data) // SUM_BYTES):
        (index,) = struct.unpack_from("<Q", data, i * SUM_BYTES)
        if index >= keep_from:
            if i:
                durable.write_atomic(path, data[i * SUM_BYTES:], mode=0o600)
            return


def check_snapshot(raft_dir: Path, first_index: int | None) -> tuple[int, int] | None:
    """The snapshot's (prev index, prev term), checked whole, or None without one.

    JournalDamaged when it is damaged, or when the journal (first entry `first_index`)
    starts past it: the entries in between would be missing."""
    path = raft_dir / SNAPSHOT_NAME
    if not path.exists():
        if first_index is not None and first_index > 1:
            raise JournalDamaged(f"the journal starts at entry {first_index}, and the snapshot "
                                 "that holds the entries before it is missing")
        return None
    prev_index, prev_term, _last, _term = read_header(path.read_bytes())
    if first_index is not None and first_index > prev_index:
        raise JournalDamaged(f"the journal starts at entry {first_index}, past the snapshot's "
                             f"entry {prev_index}: the entries in between are missing")
    return prev_index, prev_term


def finish_compaction(raft_dir: Path) -> None:
    """Complete a compaction a crash interrupted, before pysyncobj reads the directory:
    drop temporary files, and trim a journal (and its sums) that still holds entries the
    durable snapshot covers. pysyncobj would otherwise throw the journal's tail away."""
    for leftover in (f"{SNAPSHOT_NAME}.tmp", f"{SNAPSHOT_NAME}.1.tmp"):
        (raft_dir / leftover).unlink(missing_ok=True)
    journal = raft_dir / "raft.journal"
    if not journal.exists():
        return
    records = scan(journal.read_bytes())
    held = check_snapshot(raft_dir, records[0].index if records else None)
    if held is None or not records:
        return
    prev_index, prev_term = held
    match = [r for r in records if r.index == prev_index]
    if match and match[0].term == prev_term:
        trim_journal_file(journal, prev_index)
        sums = journal.with_name(journal.name + ".sums")
        if sums.exists():
            trim_sums_file(sums, prev_index)
