"""Signed tree heads against the log: stored checkpoints, the trusted head, truncation.

A checkpoint signs the Merkle root over the first `tree_size` entries. Stored ones live
in the same database as the entries, so whoever can delete rows can delete them too; the
trusted head comes from elsewhere (the signed head the cluster commits through Raft) and
so also pins the signer, by its key id. Pure: the walk in `verify` hands in the roots and
keys in force at the sizes asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from coordinator.audit.canonical import CanonicalError, is_sha256_hex
from coordinator.audit.entry import Checkpoint
from coordinator.audit.keys import SignatureChecker

Report = Callable[..., None]
"""`report(check, reason, seq=None, cp=None)`: records one issue."""


@dataclass(frozen=True)
class TreeHeads:
    """The walk's heads: tree size -> (root hex, public key, key id) in force there."""

    heads: dict[int, tuple[str, bytes | None, str | None]]
    size: int
    checker: SignatureChecker
    report: Report

    def holds_trusted_head(self, head: Checkpoint) -> bool:
        """Whether the log holds the trusted head: its size, its root, under its key."""
        size, report = self.size, self.report
        if type(head.tree_size) is not int or head.tree_size <= 0:
            report("trusted_head", f"the trusted head has invalid tree size {head.tree_size!r}")
            return False
        if head.tree_size > size:
            report("truncation", f"log ends after {size} entries but the cluster's signed "
                   f"head covers {head.tree_size} (tail deleted)", size)
            return False
        root_hex, key, kid = self.heads[head.tree_size]
        if head.root_hash != root_hex:
            report("trusted_head", f"the first {head.tree_size} entries do not match the "
                   "cluster's signed head (the log was rewritten)", cp=head.tree_size)
            return False
        if key is None or head.key_id != kid or not signed_by(self.checker, key, head):
            report("trusted_head", f"the cluster's signed head is signed by key "
                   f"{head.key_id}, not by this log's key {kid} (the log was re-signed)",
                   cp=head.tree_size)
            return False
        return True

    def check_checkpoints(self, cps: Sequence[Checkpoint]) -> tuple[int, int | None]:
        """Each checkpoint's root and signature against the log; returns how many held,
        and the largest tree size signed beyond the log's end (its tail was deleted)."""
        checked, truncated_to = 0, None
        for cp in cps:
            if type(cp.tree_size) is not int or cp.tree_size <= 0:
                self.report("checkpoint", f"checkpoint has invalid tree size {cp.tree_size!r}")
                continue
            if cp.tree_size > self.size:
                truncated_to = max(truncated_to or 0, cp.tree_size)
                continue
            root_hex, key, kid = self.heads[cp.tree_size]
            if cp.root_hash != root_hex:
                self.report("checkpoint", f"signed root at tree size {cp.tree_size} does not "
                            "match the entries", cp=cp.tree_size)
            elif key is None or cp.key_id != kid or not signed_by(self.checker, key, cp):
                self.report("checkpoint", f"checkpoint at tree size {cp.tree_size} is not "
                            f"signed by key {kid}", cp=cp.tree_size)
            else:
                checked += 1
        return checked, truncated_to

    def check_truncation(self, truncated_to: int | None, expected_size: int | None) -> None:
        """A log shorter than a signed checkpoint, or than the size the caller expects."""
        size = self.size
        if truncated_to is not None:
            self.report("truncation", f"log ends after {size} entries but a signed "
                        f"checkpoint covers {truncated_to} (tail deleted)", size)
        if (expected_size is not None and size < expected_size
                and (truncated_to or 0) < expected_size):
            self.report("truncation", f"log has {size} entries, fewer than the "
                        f"{expected_size} expected", size)


def signed_by(checker: SignatureChecker, key: bytes, cp: Checkpoint) -> bool:
    """Whether `cp`'s signature over its message verifies under `key`."""
    if not is_sha256_hex(cp.root_hash):
        return False
    try:
        signature = bytes.fromhex(cp.signature)
        message = cp.message()
    except (ValueError, TypeError, CanonicalError):
        return False
    return checker.check(key, signature, message)
