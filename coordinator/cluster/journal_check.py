"""The Raft journal's integrity: each record's checksum, its framing, bounded terms.

pysyncobj 0.3.17 keeps its log in one file of length-framed records (index, term,
pickled command) and the current term and vote in a pickled side file, with no checksum.
A damaged record was read as whatever it decoded to: an edited command diverged a node's
state silently; a term read as 2^64 spread to every node and no journal could be written
again. So fedraft keeps a checksum per record in a file beside the journal
(`raft.journal.sums`: index and SHA-256 of the record's bytes, appended and synced
with the record before it is acknowledged) and one inside the term/vote file, and checks
both, with the framing, before pysyncobj reads either. A node that finds damage does
not start (no vote, no lead, nothing served) and names the damage in one line;
`fedraft node recover` moves the journal aside so that the node rejoins from its peers.

`scan` and `check` are pure (bytes in, records or `JournalDamaged` out); `JournalSums`
and `check_raft_dir` are the file edges.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_TERM = 2**48
"""Highest Raft term accepted from disk or from a peer: one election a millisecond for
8,900 years, and far below what pysyncobj's 8-byte fields can hold."""
MAX_INDEX = 2**48

APP_NAME = b"PYSYNCOBJ"
FORMAT_VERSION = 1
FIRST_RECORD_OFFSET = 24 + 8 + 4 + 4
LAST_RECORD_OFFSET_AT = 24 + 8 + 4
SUM_BYTES = 8 + 32
META_SUM = "fedraft_sum"


class JournalDamaged(Exception):
    """The journal or its term/vote file is damaged; the message says where and how."""


@dataclass(frozen=True)
class Record:
    index: int
    term: int
    digest: bytes  # SHA-256 of the record's bytes (index, term, command)
    offset: int = 0  # where the record starts in the journal file


def record_digest(index: int, term: int, command: bytes) -> bytes:
    return hashlib.sha256(struct.pack("<QQ", index, term) + command).digest()


def scan(data: bytes, digests: bool = True) -> list[Record]:
    """The records of a journal file's bytes; JournalDamaged on bad framing or order.
    Without `digests` (where only the framing is needed) no record is hashed."""
    if len(data) < FIRST_RECORD_OFFSET or not data.startswith(APP_NAME):
        raise JournalDamaged("the journal header is not pysyncobj's")
    version, end = struct.unpack_from("<II", data, 24 + 8)
    if version != FORMAT_VERSION:
        raise JournalDamaged(f"the journal format version is {version}, not {FORMAT_VERSION}")
    if not FIRST_RECORD_OFFSET <= end <= len(data):
        raise JournalDamaged(f"the journal says it ends at byte {end}, outside the file "
                             f"({len(data)} bytes)")
    records: list[Record] = []
    at = FIRST_RECORD_OFFSET
    while at < end:
        where = f"record {len(records) + 1} (byte {at})"
        if at + 4 > end:
            raise JournalDamaged(f"{where} is cut short")
        (size,) = struct.unpack_from("<I", data, at)
        if size < 16 or at + 8 + size > end:
            raise JournalDamaged(f"{where} claims {size} bytes, past the journal's end")
        (trailer,) = struct.unpack_from("<I", data, at + 4 + size)
        if trailer != size:
            raise JournalDamaged(f"{where}: its length fields disagree ({size}, {trailer})")
        index, term = struct.unpack_from("<QQ", data, at + 4)
        if term > MAX_TERM or index > MAX_INDEX:
            raise JournalDamaged(f"{where}: term {term} or index {index} is out of bounds")
        if records and (index != records[-1].index + 1 or term < records[-1].term):
            raise JournalDamaged(f"{where}: index {index} term {term} does not follow index "
                                 f"{records[-1].index} term {records[-1].term}")
        digest = hashlib.sha256(data[at + 4: at + 4 + size]).digest() if digests else b""
        records.append(Record(index, term, digest, at))
        at += size + 8
    return records


def check(records: Sequence[Record], sums: bytes) -> int:
    """Hold `records` against the sums file's bytes; returns how many records have no
    sum yet (at most one: the last append, never acknowledged, if the node died between
    writing it and its sum). JournalDamaged on any mismatch."""
    if len(sums) % SUM_BYTES:
        sums = sums[: len(sums) - len(sums) % SUM_BYTES]  # a torn last sum: its record is unacked
    count = len(sums) // SUM_BYTES
    skip = 0  # sums of entries a compaction trimmed from the journal, not yet from its sums
    while records and skip < count and _sum_index(sums, skip) < records[0].index:
        skip += 1
    count -= skip
    for i, rec in enumerate(records[:count]):
        index, digest = struct.unpack_from("<Q32s", sums, (skip + i) * SUM_BYTES)
        if index != rec.index or digest != rec.digest:
            raise JournalDamaged(f"record {i + 1} (index {rec.index}, term {rec.term}) does "
                                 "not match its checksum")
    missing = len(records) - min(count, len(records))
    if missing > 1:
        raise JournalDamaged(f"{missing} records at the journal's end have no checksum")
    return missing


def _sum_index(sums: bytes, i: int) -> int:
    return struct.unpack_from("<Q", sums, i * SUM_BYTES)[0]


def meta_digest(meta: Mapping[str, Any]) -> str:
    fields = (meta.get("currentTerm"), meta.get("votedForNodeId"), meta.get("raftCommitIndex"))
    return hashlib.sha256(repr(fields).encode()).hexdigest()


def check_meta(meta: Mapping[str, Any], last_term: int) -> None:
    """The term/vote file: its checksum (when it has one), and bounds."""
    if META_SUM in meta and meta[META_SUM] != meta_digest(meta):
        raise JournalDamaged("the term/vote file does not match its checksum")
    term = meta.get("currentTerm", 0)
    if type(term) is not int or not 0 <= term <= MAX_TERM:
        raise JournalDamaged(f"the term/vote file holds term {term!r}, out of bounds")
    if term < last_term:
        raise JournalDamaged(f"the term/vote file holds term {term}, below the last record's "
                             f"{last_term}")
    commit = meta.get("raftCommitIndex", 1)
    if type(commit) is not int or not 0 <= commit <= MAX_INDEX:
        raise JournalDamaged(f"the term/vote file's commit index {commit!r} is out of bounds")


class JournalSums:
    """The checksum file beside the journal: appended, truncated and synced with it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._open()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        size = os.fstat(self._fd).st_size
        self._count = size // SUM_BYTES
        os.ftruncate(self._fd, self._count * SUM_BYTES)

    def __len__(self) -> int:
        return self._count

    def append(self, index: int, term: int, command: bytes) -> None:
        entry = struct.pack("<Q32s", index, record_digest(index, term, command))
        os.pwrite(self._fd, entry, self._count * SUM_BYTES)
        self._count += 1

    def truncate(self, count: int) -> None:
        self._count = min(self._count, count)
        os.ftruncate(self._fd, self._count * SUM_BYTES)

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)

    def reopen(self) -> None:
        """Open the file again after a compaction replaced it (`snapshot.trim_sums_file`)."""
        os.close(self._fd)
        self._open()


def check_raft_dir(journal: Path) -> list[Record]:
    """Check a node's journal, its sums and its term/vote file before pysyncobj reads
    them; returns the records. A journal written before sums existed gets them now (from
    what it holds: trusted once). Raises JournalDamaged naming the file and the damage."""
    from pysyncobj.pickle import loads  # pysyncobj's own reader of its term/vote file

    sums_path = journal.with_name(journal.name + ".sums")
    meta_path = journal.with_name(journal.name + ".meta")
    if not journal.exists():
        if sums_path.exists() and sums_path.stat().st_size:
            raise JournalDamaged(f"{journal} is missing but its checksums are not")
        return []
    try:
        records = scan(journal.read_bytes())
        if sums_path.exists():
            check(records, sums_path.read_bytes())
        meta: dict[str, Any] = {}
        if meta_path.exists():
            try:
                meta = loads(meta_path.read_bytes())
            except Exception as exc:
                raise JournalDamaged(f"the term/vote file {meta_path} is unreadable "
                                     f"({type(exc).__name__})") from None
            if not isinstance(meta, dict):
                raise JournalDamaged(f"the term/vote file {meta_path} holds no map")
        last = records[-1] if records else Record(0, 0, b"")
        check_meta(meta, last.term)
    except JournalDamaged as exc:
        raise JournalDamaged(f"{journal.parent}: {exc}") from None
    return records
