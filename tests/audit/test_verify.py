"""The pure verifier on in-memory entry lists: edits an attacker could make to an export."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest

from coordinator.audit import AuditSigner, AuditStore, Checkpoint, Entry, verify_log
from coordinator.audit.canonical import sha256_hex
from coordinator.audit.entry import (
    CHECKPOINT_CONTEXT,
    ENTRY_CONTEXT,
    checkpoint_message,
    compute_entry_hash,
)

from .conftest import Built, build_log

Log = tuple[list[Entry], list[Checkpoint], Built]


@pytest.fixture
def log(signer: AuditSigner) -> Iterator[Log]:
    with AuditStore("sqlite://", signer=signer, checkpoint_every=8) as store:
        built = build_log(store)
        yield store.entries(), store.checkpoints(), built


def resign(entry: Entry, signer: AuditSigner, **changes: Any) -> Entry:
    """What an attacker holding ``signer`` could produce for a changed entry."""
    e = dataclasses.replace(entry, key_id=signer.key_id, **changes)
    h = compute_entry_hash(e.seq, e.kind, e.payload, e.raft_index, e.prev_hash, e.key_id)
    return dataclasses.replace(
        e, entry_hash=h, signature=signer.sign(ENTRY_CONTEXT + bytes.fromhex(h)).hex())


def test_untouched(log: Log, signer: AuditSigner) -> None:
    entries, cps, _ = log
    report = verify_log(entries, cps, genesis_key=signer.public_key_hex)
    assert report.ok and report.first_bad_seq is None and report.reason is None
    assert report.to_dict()["counts"]["entries"] == len(entries)


def test_reordered_entries(log: Log) -> None:
    entries, cps, _ = log
    shuffled = list(entries)
    shuffled[10], shuffled[11] = shuffled[11], shuffled[10]
    report = verify_log(shuffled, cps)
    assert not report.ok and report.first_bad_seq == 10


def test_inserted_entry(log: Log, signer: AuditSigner) -> None:
    entries, cps, _ = log
    forged = resign(entries[20], AuditSigner.generate(), payload={"site": "evil"},
                    kind="client_revoked")
    report = verify_log(entries[:20] + [forged] + entries[20:], cps)
    assert not report.ok and report.first_bad_seq == 20


def test_lineage_fork_is_named(signer: AuditSigner) -> None:
    with AuditStore("sqlite://", signer=signer) as store:
        built = build_log(store, rounds=4)
        fork = hashlib.sha256(b"fork").hexdigest()
        e = store.append("round_committed", {
            "round": 5, "attempt": 0, "term": 2, "version": fork, "parent": built.versions[2],
            "size": 1, "participants": [], "survivors": [], "metrics": {}, "charges": {}}, 999)
        again = store.append("round_committed", {
            "round": 5, "attempt": 0, "term": 2, "version": "0" * 64, "parent": fork,
            "size": 1, "participants": [], "survivors": [], "metrics": {}, "charges": {}}, 1000)
        report = store.verify()
    assert not report.ok and report.first_bad_seq == e.seq
    assert "latest version" in (report.reason or "")
    assert any(i.seq == again.seq and "second time" in i.reason for i in report.issues)


def test_genesis_problems(log: Log, signer: AuditSigner) -> None:
    entries, cps, _ = log
    report = verify_log(entries[1:], cps)
    assert not report.ok and report.first_bad_seq == 0
    second = resign(entries[0], signer, seq=5, prev_hash=entries[4].entry_hash, raft_index=100)
    report = verify_log(entries[:5] + [second], [])
    assert not report.ok and "second genesis" in (report.reason or "")
    assert verify_log([], []).ok and verify_log([], []).warnings
    report = verify_log([], cps)
    assert not report.ok and report.first_bad_seq == 0


def test_forged_rotation_is_named(log: Log, signer: AuditSigner) -> None:
    entries, _, _ = log
    attacker = AuditSigner.generate()
    n = len(entries)
    rotation = resign(
        entries[-1], attacker, seq=n, prev_hash=entries[-1].entry_hash, raft_index=10_000,
        kind="key_rotation",
        payload={"alg": "ed25519", "public_key": attacker.public_key_hex,
                 "key_id": attacker.key_id})
    after = resign(rotation, attacker, seq=n + 1, prev_hash=rotation.entry_hash,
                   raft_index=10_001, kind="client_revoked", payload={"site": "x"})
    report = verify_log(entries + [rotation, after], [], genesis_key=signer.public_key)
    assert not report.ok and report.first_bad_seq == n


def test_checkpoint_by_wrong_key(log: Log, signer: AuditSigner) -> None:
    entries, cps, _ = log
    attacker = AuditSigner.generate()
    cp = cps[1]
    forged = Checkpoint(cp.tree_size, cp.root_hash, cp.key_id,
                        attacker.sign(checkpoint_message(cp.tree_size, cp.root_hash,
                                                         cp.key_id)).hex())
    report = verify_log(entries, [cps[0], forged])
    assert not report.ok and report.bad_checkpoint == cp.tree_size
    # an entry signature cannot stand in for a checkpoint signature, nor the reverse
    assert not CHECKPOINT_CONTEXT.startswith(ENTRY_CONTEXT)
    swapped = dataclasses.replace(entries[3], signature=cp.signature)
    assert verify_log(entries[:3] + [swapped] + entries[4:]).first_bad_seq == 3


def test_garbage_fields_do_not_crash(log: Log) -> None:
    entries, cps, _ = log
    bad = list(entries)
    bad[4] = dataclasses.replace(bad[4], signature="zz", entry_hash="not hex")
    bad[6] = dataclasses.replace(bad[6], payload={"x": float("nan")})
    report = verify_log(bad, cps + [Checkpoint(-1, "x", "y", "z")])
    assert not report.ok and report.first_bad_seq == 4
    assert 6 in {i.seq for i in report.issues}


def test_max_issues_caps_the_list(log: Log) -> None:
    entries, _, _ = log
    wrecked = [dataclasses.replace(e, signature="00" * 64) for e in entries]
    report = verify_log(wrecked, max_issues=5)
    assert len(report.issues) == 5 and report.first_bad_seq == 0
    assert any("further issues" in w for w in report.warnings)
    assert sha256_hex(b"") == hashlib.sha256(b"").hexdigest()
