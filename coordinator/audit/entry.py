"""Audit entries and checkpoints: their fields, hashes and signed messages (pure).

An entry's hash is SHA-256 over the canonical JSON (see ``canonical``) of the object

    {"key_id", "kind", "payload", "prev_hash", "raft_index", "seq", "v": 1}

so the hash binds the entry's position (``seq``), its predecessor (``prev_hash``), the Raft
command it came from and the key that claims to sign it. The signature is Ed25519 over
``ENTRY_CONTEXT || entry_hash`` (32 raw bytes). A checkpoint's signature is Ed25519 over
``CHECKPOINT_CONTEXT || canonical({"key_id", "root_hash", "tree_size", "type":
"checkpoint", "v": 1})``. The context labels keep an entry signature from ever passing as a
checkpoint signature or as a signature in some other protocol that uses the same key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from coordinator.audit.canonical import (
    CanonicalError,
    canonical_bytes,
    is_sha256_hex,
    sha256_hex,
)

FORMAT_VERSION = 1
GENESIS_PREV_HASH = "0" * 64
GENESIS_RAFT_INDEX = 0
ENTRY_CONTEXT = b"fedraft/audit/entry/v1\x00"
CHECKPOINT_CONTEXT = b"fedraft/audit/checkpoint/v1\x00"

GENESIS = "genesis"
KEY_ROTATION = "key_rotation"
ROUND_OPENED = "round_opened"
ROUND_COMMITTED = "round_committed"
ROUND_ABORTED = "round_aborted"
CHARGE_RECORDED = "charge_recorded"
"""A late charge on an aborted attempt: its leader died holding the site's update."""
MODEL_GENESIS = "model_genesis"
CLIENT_ENROLLED = "client_enrolled"
CLIENT_REVOKED = "client_revoked"
CLIENT_QUARANTINED = "client_quarantined"
BUDGET_CHANGED = "budget_changed"
MEMBERSHIP_CHANGED = "membership_changed"

ROUND_KINDS = frozenset({ROUND_OPENED, ROUND_COMMITTED, ROUND_ABORTED, CHARGE_RECORDED})
KEY_KINDS = frozenset({GENESIS, KEY_ROTATION})
MODEL_KINDS = frozenset({MODEL_GENESIS, ROUND_COMMITTED})
CHARGE_FIELDS = ("noise_multiplier", "sample_rate", "steps", "clip_norm", "epsilon", "delta")

_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class PayloadError(ValueError):
    """A payload that does not fit its kind; raised before anything is written."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One audit log entry as stored, exported and verified."""

    seq: int
    kind: str
    payload: dict[str, Any]
    raft_index: int
    prev_hash: str
    entry_hash: str
    key_id: str
    signature: str

    def hash_preimage(self) -> bytes:
        """The canonical bytes that ``entry_hash`` must be the SHA-256 of."""
        return entry_preimage(
            self.seq, self.kind, self.payload, self.raft_index, self.prev_hash, self.key_id
        )

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON, the export line format."""
        return {
            "seq": self.seq,
            "kind": self.kind,
            "payload": self.payload,
            "raft_index": self.raft_index,
            "prev_hash": self.prev_hash,
            "entry_hash": self.entry_hash,
            "key_id": self.key_id,
            "signature": self.signature,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Entry:
        """Inverse of ``to_dict``; checks field types, not hashes (that is ``verify``'s job)."""
        if not isinstance(data, Mapping):
            raise PayloadError(f"an entry is a JSON object, not {type(data).__name__}")
        try:
            entry = cls(
                seq=data["seq"],
                kind=data["kind"],
                payload=data["payload"],
                raft_index=data["raft_index"],
                prev_hash=data["prev_hash"],
                entry_hash=data["entry_hash"],
                key_id=data["key_id"],
                signature=data["signature"],
            )
        except KeyError as exc:
            raise PayloadError(f"entry lacks field {exc.args[0]!r}") from exc
        ints = (entry.seq, entry.raft_index)
        strs = (entry.kind, entry.prev_hash, entry.entry_hash, entry.key_id, entry.signature)
        if (
            not all(type(v) is int for v in ints)
            or not all(isinstance(v, str) for v in strs)
            or not isinstance(entry.payload, dict)
        ):
            raise PayloadError("entry fields have the wrong types")
        return entry


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed Merkle tree head over the first ``tree_size`` entry hashes."""

    tree_size: int
    root_hash: str
    key_id: str
    signature: str

    def message(self) -> bytes:
        """The bytes the checkpoint signature covers."""
        return checkpoint_message(self.tree_size, self.root_hash, self.key_id)

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON, the export line format."""
        return {
            "tree_size": self.tree_size,
            "root_hash": self.root_hash,
            "key_id": self.key_id,
            "signature": self.signature,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Checkpoint:
        """Inverse of ``to_dict``."""
        if not isinstance(data, Mapping):
            raise PayloadError(f"a checkpoint is a JSON object, not {type(data).__name__}")
        try:
            cp = cls(data["tree_size"], data["root_hash"], data["key_id"], data["signature"])
        except KeyError as exc:
            raise PayloadError(f"checkpoint lacks field {exc.args[0]!r}") from exc
        if type(cp.tree_size) is not int or not all(
            isinstance(v, str) for v in (cp.root_hash, cp.key_id, cp.signature)
        ):
            raise PayloadError("checkpoint fields have the wrong types")
        return cp


def entry_preimage(
    seq: int, kind: str, payload: Any, raft_index: int, prev_hash: str, key_id: str
) -> bytes:
    """Canonical bytes of the hashed part of an entry."""
    return canonical_bytes(
        {
            "key_id": key_id,
            "kind": kind,
            "payload": payload,
            "prev_hash": prev_hash,
            "raft_index": raft_index,
            "seq": seq,
            "v": FORMAT_VERSION,
        }
    )


def compute_entry_hash(
    seq: int, kind: str, payload: Any, raft_index: int, prev_hash: str, key_id: str
) -> str:
    """SHA-256 hex of an entry's canonical encoding."""
    return sha256_hex(entry_preimage(seq, kind, payload, raft_index, prev_hash, key_id))


def entry_signing_message(entry_hash: str) -> bytes:
    """What an entry signature covers: context label plus the raw entry hash."""
    return ENTRY_CONTEXT + bytes.fromhex(entry_hash)


def checkpoint_message(tree_size: int, root_hash: str, key_id: str) -> bytes:
    """What a checkpoint signature covers: context label plus canonical tree head."""
    return CHECKPOINT_CONTEXT + canonical_bytes(
        {
            "key_id": key_id,
            "root_hash": root_hash,
            "tree_size": tree_size,
            "type": "checkpoint",
            "v": FORMAT_VERSION,
        }
    )


# --- payload rules -------------------------------------------------------------------------
#
# Writers are checked strictly so that a coordinator bug surfaces at append time, on the node,
# instead of as an unreadable round in an auditor's report. Extra keys are allowed so that the
# coordinator can add context (for example a timestamp taken from the Raft command) without a
# change here.


def _is_int(v: object) -> bool:
    return type(v) is int


def _is_number(v: object) -> bool:
    return type(v) in (int, float)


def _is_str(v: object) -> bool:
    return isinstance(v, str)


def _is_hex(v: object) -> bool:
    return is_sha256_hex(v)


def _is_str_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_metrics(v: object) -> bool:
    return isinstance(v, dict) and all(_is_number(x) for x in v.values())


def _is_charges(v: object) -> bool:
    if not isinstance(v, dict):
        return False
    for params in v.values():
        if not isinstance(params, dict):
            return False
        if not all(f in params and _is_number(params[f]) for f in CHARGE_FIELDS):
            return False
    return True


_RULES: dict[str, dict[str, Any]] = {
    ROUND_OPENED: {
        "round": _is_int,
        "attempt": _is_int,
        "term": _is_int,
        "base": _is_hex,
        "participants": _is_str_list,
        "config_digest": _is_str,
    },
    ROUND_COMMITTED: {
        "round": _is_int,
        "attempt": _is_int,
        "term": _is_int,
        "version": _is_hex,
        "parent": _is_hex,
        "size": _is_int,
        "participants": _is_str_list,
        "survivors": _is_str_list,
        "metrics": _is_metrics,
        "charges": _is_charges,
    },
    ROUND_ABORTED: {"round": _is_int, "attempt": _is_int, "term": _is_int, "reason": _is_str},
    CHARGE_RECORDED: {
        "round": _is_int,
        "attempt": _is_int,
        "term": _is_int,
        "site": _is_str,
        "charges": _is_charges,
    },
    MODEL_GENESIS: {"version": _is_hex, "size": _is_int},
    CLIENT_ENROLLED: {
        "site": _is_str,
        "public_key": _is_str,
        "epsilon": _is_number,
        "delta": _is_number,
    },
    CLIENT_REVOKED: {"site": _is_str},
    CLIENT_QUARANTINED: {"site": _is_str, "reason": _is_str, "round": _is_int,
                         "attempt": _is_int},
    BUDGET_CHANGED: {"site": _is_str, "epsilon": _is_number, "delta": _is_number},
    MEMBERSHIP_CHANGED: {"change": _is_str, "node": _is_str},
    GENESIS: {"alg": _is_str, "public_key": _is_str, "key_id": _is_str},
    KEY_ROTATION: {"alg": _is_str, "public_key": _is_str, "key_id": _is_str},
}

_RULE_HINTS = {
    _is_int: "an integer",
    _is_number: "a number",
    _is_str: "a string",
    _is_hex: "64 lower-case hex digits",
    _is_str_list: "a list of strings",
    _is_metrics: "an object of numbers",
    _is_charges: f"an object of site -> {{{', '.join(CHARGE_FIELDS)}}} numbers",
}

KNOWN_KINDS = frozenset(_RULES)


def validate_kind(kind: str) -> None:
    """Kinds are short snake_case names; unknown ones are allowed for forward compatibility."""
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise PayloadError(f"kind {kind!r} is not a snake_case name of at most 64 characters")


def validate_payload(kind: str, payload: Mapping[str, Any]) -> None:
    """Raise PayloadError when a payload of a known kind lacks a field or has a bad type."""
    validate_kind(kind)
    if not isinstance(payload, Mapping):
        raise PayloadError(f"{kind}: payload must be a JSON object")
    rules = _RULES.get(kind)
    if rules is None:
        return
    for field, rule in rules.items():
        if field not in payload:
            raise PayloadError(f"{kind}: payload lacks {field!r}")
        if not rule(payload[field]):
            raise PayloadError(f"{kind}: {field!r} must be {_RULE_HINTS[rule]}")
    if kind in ROUND_KINDS and payload["round"] < 0:
        raise PayloadError(f"{kind}: 'round' must not be negative")
    if kind == CHARGE_RECORDED and list(payload["charges"]) != [payload["site"]]:
        raise PayloadError(f"{kind}: 'charges' must charge exactly the entry's site")


__all__ = [
    "CHARGE_FIELDS",
    "CanonicalError",
    "Checkpoint",
    "Entry",
    "PayloadError",
    "checkpoint_message",
    "compute_entry_hash",
    "entry_preimage",
    "entry_signing_message",
    "validate_payload",
]
