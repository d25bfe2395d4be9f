"""What the audit store raises when a log cannot be written or read as asked.

``AuditKeyError`` (a missing or unusable key) lives with the keys in ``keys``; payload and
encoding errors live in ``entry`` and ``canonical``.
"""

from __future__ import annotations


class AuditError(RuntimeError):
    """Base class for audit store failures."""


class AuditConflictError(AuditError):
    """The Raft index is already recorded with a different kind or payload."""


class AuditOrderError(AuditError):
    """A Raft index below the newest recorded one that was never recorded: a skipped command."""


class AuditGapError(AuditOrderError):
    """The entry would not land at the seq the replicated state expects: entries missing."""


class AuditIntegrityError(AuditError):
    """The stored log is damaged; the store refuses to extend it."""


class AuditSchemaError(AuditError):
    """The database has no audit schema (opened without migrating)."""


__all__ = [
    "AuditConflictError",
    "AuditError",
    "AuditGapError",
    "AuditIntegrityError",
    "AuditOrderError",
    "AuditSchemaError",
]
