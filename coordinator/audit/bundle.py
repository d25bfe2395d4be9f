"""Offline export bundles: the audit log as files an auditor can verify without the database.

A bundle directory holds

* ``entries.jsonl``: one entry per line in seq order, each line the canonical JSON of the
  entry's fields (``seq kind payload raft_index prev_hash entry_hash key_id signature``);
* ``checkpoints.jsonl``: one signed checkpoint per line (``tree_size root_hash key_id
  signature``);
* ``keys.json``: the audit keys in the order the log introduces them, and the seq from
  which each signs;
* ``manifest.json``: format, counts, head, SHA-256 of each file, and how to verify.

Nothing in the bundle needs to be trusted on its word: entries and checkpoints carry their
own hashes and signatures. The manifest's count lets ``verify`` notice a tail cut off after
export; its file hashes only flag files changed after export (a warning, since whoever
changes a file can change the manifest too). Pin the genesis key for a real guarantee.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from coordinator import durable
from coordinator.audit.canonical import canonical_text
from coordinator.audit.entry import GENESIS, KEY_ROTATION, Checkpoint, Entry, PayloadError
from coordinator.audit.query import (
    RoundView,
    SpendSeries,
    group_rounds,
    lineage,
    privacy_spend,
    select_rounds,
)
from coordinator.audit.verify import Issue, KeyInForce, VerifyReport, verify_log

BUNDLE_FORMAT = "fedraft-audit-bundle"
BUNDLE_VERSION = 1
ENTRIES_FILE = "entries.jsonl"
CHECKPOINTS_FILE = "checkpoints.jsonl"
KEYS_FILE = "keys.json"
MANIFEST_FILE = "manifest.json"

VERIFY_RECIPE = (
    "entry_hash = sha256(canonical JSON of {key_id, kind, payload, prev_hash, raft_index, "
    "seq, v: 1}); signature = Ed25519 over b'fedraft/audit/entry/v1\\x00' || entry_hash; "
    "checkpoint root = RFC 6962 Merkle tree head over the raw entry hashes; checkpoint "
    "signature = Ed25519 over b'fedraft/audit/checkpoint/v1\\x00' || canonical JSON of "
    "{key_id, root_hash, tree_size, type: 'checkpoint', v: 1}. Canonical JSON: sorted keys, "
    "no whitespace, UTF-8, floats as Python repr. Run `fedraft audit verify --bundle DIR`."
)


class BundleError(ValueError):
    """A directory that is not a readable audit bundle."""


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, lines: Iterable[str]) -> None:
    """Stream text lines into `path` atomically and durably (UTF-8, `\\n` line ends)."""
    durable.write_atomic(path, (line.encode("utf-8") for line in lines))


def export_bundle(
    entries: Iterable[Entry],
    checkpoints: Iterable[Checkpoint],
    directory: Path,
    *,
    source: str | None = None,
) -> dict[str, Any]:
    """Write a bundle to ``directory`` (created if needed) and return its manifest.

    Entries are streamed, so exporting a large log does not hold it in memory.
    """
    directory.mkdir(parents=True, exist_ok=True)
    keys: list[dict[str, Any]] = []
    head: dict[str, Any] | None = None
    count = 0

    def entry_lines() -> Iterable[str]:
        nonlocal head, count
        for e in entries:
            if e.kind in (GENESIS, KEY_ROTATION):
                keys.append(
                    {
                        "key_id": e.payload.get("key_id"),
                        "public_key": e.payload.get("public_key"),
                        "alg": e.payload.get("alg"),
                        "introduced_at_seq": e.seq,
                        "signs_from_seq": e.seq if e.kind == GENESIS else e.seq + 1,
                    }
                )
            head = {"seq": e.seq, "entry_hash": e.entry_hash}
            count += 1
            yield canonical_text(e.to_dict()) + "\n"

    _write_atomic(directory / ENTRIES_FILE, entry_lines())
    cps = list(checkpoints)
    _write_atomic(directory / CHECKPOINTS_FILE, (canonical_text(c.to_dict()) + "\n" for c in cps))
    _write_atomic(directory / KEYS_FILE, [json.dumps(keys, indent=2) + "\n"])
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "source": source,
        "entries": count,
        "checkpoints": len(cps),
        "head": head,
        "latest_checkpoint": cps[-1].to_dict() if cps else None,
        "genesis_public_key": keys[0]["public_key"] if keys else None,
        "files": {
            name: _file_sha256(directory / name)
            for name in (ENTRIES_FILE, CHECKPOINTS_FILE, KEYS_FILE)
        },
        "verify": VERIFY_RECIPE,
    }
    _write_atomic(directory / MANIFEST_FILE, [json.dumps(manifest, indent=2) + "\n"])
    return manifest


class Bundle:
    """Read side of an export: the same query and verify API as ``AuditStore``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST_FILE
        if not manifest_path.is_file():
            raise BundleError(f"{self.directory} is not an audit bundle (no {MANIFEST_FILE})")
        try:
            manifest = json.loads(manifest_path.read_text("utf-8"))
        except (ValueError, RecursionError) as exc:  # deep nesting is a RecursionError
            raise BundleError(f"unreadable {MANIFEST_FILE}: {exc}") from exc
        if not isinstance(manifest, dict):
            raise BundleError(f"{manifest_path} is not a {BUNDLE_FORMAT} manifest")
        self.manifest: dict[str, Any] = manifest
        if self.manifest.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{manifest_path} is not a {BUNDLE_FORMAT} manifest")
        if self.manifest.get("format_version") != BUNDLE_VERSION:
            raise BundleError(f"unsupported bundle version {self.manifest.get('format_version')}")
        size = self.manifest.get("entries")
        if size is not None and (type(size) is not int or size < 0):
            raise BundleError(f"{MANIFEST_FILE}: 'entries' must be a count, not {size!r}")
        files = self.manifest.get("files") or {}
        known = (ENTRIES_FILE, CHECKPOINTS_FILE, KEYS_FILE)  # never a path out of the bundle
        if not isinstance(files, dict) or not all(
                name in known and isinstance(digest, str) for name, digest in files.items()):
            raise BundleError(f"{MANIFEST_FILE}: 'files' must map {', '.join(known)} to hashes")
        self._entries: list[Entry] | None = None
        self._line_issues: list[Issue] = []

    def describe(self) -> str:
        """Where this log lives."""
        return str(self.directory)

    def entries(self) -> list[Entry]:
        """All readable entries in file order (the order verification checks)."""
        if self._entries is None:
            out: list[Entry] = []
            path = self.directory / ENTRIES_FILE
            if not path.is_file():
                raise BundleError(f"bundle lacks {ENTRIES_FILE}")
            with path.open("rb") as fh:  # decoded per line: one bad byte spoils one entry
                for lineno, line in enumerate(fh):
                    if not line.strip():
                        continue
                    try:
                        out.append(Entry.from_dict(json.loads(line.decode("utf-8"))))
                    except (ValueError, PayloadError, TypeError, RecursionError) as exc:
                        # Line n normally holds seq n; name that position as the bad entry.
                        self._line_issues.append(
                            Issue("bundle", f"{ENTRIES_FILE} line {lineno + 1} unreadable:"
                                  f" {exc}", lineno)
                        )
            self._entries = out
        return self._entries

    def checkpoints(self) -> list[Checkpoint]:
        """All checkpoints in the bundle."""
        path = self.directory / CHECKPOINTS_FILE
        if not path.is_file():
            return []
        out = []
        with path.open("rb") as fh:
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        out.append(Checkpoint.from_dict(json.loads(line.decode("utf-8"))))
                    except (ValueError, PayloadError, TypeError, RecursionError) as exc:
                        raise BundleError(f"{CHECKPOINTS_FILE} line {lineno}: {exc}") from exc
        return out

    def __len__(self) -> int:
        return len(self.entries())

    def rounds(
        self, since: int | None = None, until: int | None = None, site: str | None = None
    ) -> list[RoundView]:
        """As ``AuditStore.rounds``."""
        return select_rounds(self.entries(), since, until, site)

    def round(self, number: int) -> RoundView | None:
        """As ``AuditStore.round``."""
        return group_rounds(self.entries()).get(number)

    def lineage(self, version: str) -> list[Entry]:
        """As ``AuditStore.lineage``."""
        return lineage(self.entries(), version)

    def spend(self) -> dict[str, SpendSeries]:
        """As ``AuditStore.spend``."""
        return privacy_spend(self.entries())

    def keys(self) -> list[KeyInForce]:
        """As ``AuditStore.keys`` (derived from the entries, not from keys.json)."""
        out = []
        for e in self.entries():
            if e.kind in (GENESIS, KEY_ROTATION):
                start = e.seq if e.kind == GENESIS else e.seq + 1
                out.append(KeyInForce(str(e.payload.get("key_id")),
                                      str(e.payload.get("public_key")), start))
        return out

    def verify(self, **options: Any) -> VerifyReport:
        """Verify the bundle; the manifest's entry count is the expected size."""
        entries = self.entries()
        options.setdefault("expected_size", self.manifest.get("entries"))
        extra = list(self._line_issues) + list(options.pop("extra_issues", ()))
        report = verify_log(entries, self.checkpoints(), extra_issues=extra, **options)
        for name, digest in (self.manifest.get("files") or {}).items():
            path = self.directory / name
            if not path.is_file():
                report.warnings.append(f"{name} listed in the manifest is missing")
            elif _file_sha256(path) != digest:
                report.warnings.append(f"{name} changed since export (manifest hash differs)")
        return report
