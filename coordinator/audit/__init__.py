"""Tamper-evident audit log: hash-chained, Ed25519-signed entries with RFC 6962 checkpoints.

Pure core: ``canonical`` (encoding), ``entry`` (fields, hashes, payload rules), ``merkle``,
``keys``, ``verify``, ``charges`` (privacy charges recomputed over each site's history),
``lineage`` (model blobs and version lineage), ``query``. Shell: ``store`` (``AuditStore``),
``sql`` (SQLAlchemy tables and engines, Alembic migrations), ``errors`` (what the store
raises), ``writer`` (a node's audit entries, appended off the Raft thread), ``bundle``
(offline export), ``report`` (HTML), ``cli`` (``fedraft audit``).

The coordinator writes through ``AuditStore.append``; auditors read through the CLI.
"""

from coordinator.audit.bundle import Bundle, BundleError, export_bundle
from coordinator.audit.canonical import CanonicalError, canonical_bytes, normalize
from coordinator.audit.entry import Checkpoint, Entry, PayloadError
from coordinator.audit.errors import (
    AuditConflictError,
    AuditError,
    AuditGapError,
    AuditIntegrityError,
    AuditOrderError,
    AuditSchemaError,
)
from coordinator.audit.keys import AuditKeyError, AuditSigner
from coordinator.audit.store import AuditStore
from coordinator.audit.verify import VerifyReport, verify_log

__all__ = [
    "AuditConflictError",
    "AuditError",
    "AuditGapError",
    "AuditIntegrityError",
    "AuditKeyError",
    "AuditOrderError",
    "AuditSchemaError",
    "AuditSigner",
    "AuditStore",
    "Bundle",
    "BundleError",
    "CanonicalError",
    "Checkpoint",
    "Entry",
    "PayloadError",
    "VerifyReport",
    "canonical_bytes",
    "export_bundle",
    "normalize",
    "verify_log",
]
