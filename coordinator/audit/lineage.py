"""The model history a log records: each version's blob, and the order of versions.

Two checks ``verify_log`` makes as it walks the log (pure but for reading blob files):
``BlobChecker`` rehashes every model version named by ``model_genesis``/``round_committed``
from a blob directory, and ``LineageChecker`` holds each committed version's parent to the
version committed before it, with no round committed twice (the "one version per round, one
hash chain" invariant). Both report ``(reason, seq)`` through a callback, as ``charges``
does; the callback is None for an entry already reported as damaged, whose claims are then
followed without being judged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from coordinator.audit.canonical import is_sha256_hex
from coordinator.audit.entry import MODEL_GENESIS, Entry

BlobLookup = Callable[[str], Path | None]
"""Finds the blob of a model version (sha256 hex), or None."""
Report = Callable[[str, int], None]
"""Receives (reason, seq) for each failed check."""


def default_blob_lookup(directory: Path) -> BlobLookup:
    """Find a blob named by its sha256 hex, flat (``DIR/<hex>``) or fanned out
    (``DIR/<hex[:2]>/<hex>``), the two layouts content-addressed stores use."""

    def lookup(version: str) -> Path | None:
        for candidate in (directory / version, directory / version[:2] / version):
            if candidate.is_file():
                return candidate
        return None

    return lookup


def blob_lookup(blobs: Path | str | BlobLookup | None) -> BlobLookup | None:
    """A lookup from a blob directory, or the lookup function given."""
    if blobs is None or callable(blobs):
        return blobs
    return default_blob_lookup(Path(blobs))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex of a file, streamed so a large model does not sit in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class BlobChecker:
    """Rehashes the blob of each model version (once per version); ``found`` counts the
    blobs found. With ``require`` a missing blob is a failure."""

    def __init__(self, lookup: BlobLookup, require: bool) -> None:
        self.lookup = lookup
        self.require = require
        self.found = 0
        self._seen: dict[str, str | None] = {}

    def check(self, entry: Entry, report: Report) -> None:
        """Check the blob of the version a ``model_genesis``/``round_committed`` entry names."""
        version = entry.payload.get("version")
        if not isinstance(version, str) or not is_sha256_hex(version):
            report(f"model version {version!r} is not a sha256 hex digest", entry.seq)
            return
        if version not in self._seen:
            path = self.lookup(version)
            self._seen[version] = sha256_file(path) if path is not None else None
            if path is not None:
                self.found += 1
        actual = self._seen[version]
        if actual is None:
            if self.require:
                report(f"blob {version[:16]}... is missing", entry.seq)
        elif actual != version:
            report(f"blob {version[:16]}... hashes to {actual[:16]}... (replaced)", entry.seq)


class LineageChecker:
    """Follows the committed versions in log order; notes go to ``warnings``."""

    def __init__(self, warnings: list[str]) -> None:
        self.warnings = warnings
        self.head: str | None = None  # the latest version
        self.committed: set[int] = set()

    def observe(self, entry: Entry, report: Report | None) -> None:
        """Take in a ``model_genesis`` or ``round_committed`` entry, in log order."""
        payload = entry.payload
        version = payload.get("version")
        head = self.head
        if isinstance(version, str):
            self.head = version
        if entry.kind == MODEL_GENESIS:
            return
        parent = payload.get("parent")
        rnd = payload.get("round")
        if report is None:
            pass
        elif head is None:
            self.warnings.append(
                f"seq {entry.seq}: first committed version has no model_genesis entry"
            )
        elif parent != head:
            report(
                f"round {rnd} builds on {str(parent)[:16]}..., but the latest version is"
                f" {head[:16]}...",
                entry.seq,
            )
        if isinstance(rnd, int):
            if rnd in self.committed and report is not None:
                report(f"round {rnd} is committed a second time", entry.seq)
            self.committed.add(rnd)
