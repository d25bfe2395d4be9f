"""The SQL store on SQLite and PostgreSQL: appends, idempotency, triggers, and tamper detection.

Each tamper test edits the database the way an attacker with admin rights would (triggers
out of the way), then checks that verification fails and names the first bad entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from coordinator.audit import (
    AuditConflictError,
    AuditGapError,
    AuditIntegrityError,
    AuditKeyError,
    AuditOrderError,
    AuditSigner,
    AuditStore,
    PayloadError,
)
from coordinator.audit.canonical import canonical_text
from coordinator.audit.entry import ENTRY_CONTEXT, compute_entry_hash
from privacy.accounting import DPStep

from .conftest import Backend, blob_bytes, build_log, toy_epsilon
from .test_core import json_values

CP_EVERY = 8


def _store(backend: Backend, signer: AuditSigner, **kw: Any) -> AuditStore:
    return backend.open(signer=signer, checkpoint_every=CP_EVERY,
                        genesis_info={"cluster": "test"}, **kw)


def _row(conn: Connection, seq: int) -> dict[str, Any]:
    return dict(conn.execute(text("SELECT * FROM audit_entries WHERE seq = :s"),
                             {"s": seq}).mappings().one())


def _set(conn: Connection, where_seq: int, **values: Any) -> None:
    cols = ", ".join(f"{k} = :{k}" for k in values)
    conn.execute(text(f"UPDATE audit_entries SET {cols} WHERE seq = :where_seq"),
                 {**values, "where_seq": where_seq})


# --- the untouched log ------------------------------------------------------------------------


def test_untouched_log_verifies(backend: Backend, signer: AuditSigner, tmp_path: Path) -> None:
    store = _store(backend, signer)
    built = build_log(store, blob_dir=tmp_path / "blobs", accountant=toy_epsilon)
    report = store.verify(genesis_key=signer.public_key, blobs=built.blob_dir,
                          accountant=toy_epsilon)
    assert report.ok, report.issues
    n = len(store)
    assert report.counts["entries"] == n and report.counts["signatures"] == n
    assert report.counts["checkpoints"] == n // CP_EVERY == len(store.checkpoints())
    assert report.counts["blobs"] == 13 and report.counts["charges"] == 48
    assert report.counts["rounds_committed"] == 12 and report.counts["rounds_aborted"] == 1
    assert report.head_seq == n - 1 and report.genesis_pinned and not report.warnings
    genesis = store.get(0)
    assert genesis is not None and genesis.kind == "genesis"
    assert genesis.payload["cluster"] == "test" and genesis.raft_index == 0


def test_queries(backend: Backend, signer: AuditSigner) -> None:
    store = _store(backend, signer)
    built = build_log(store)
    assert [r.round for r in store.rounds(since=2, until=4)] == [2, 3, 4]
    assert all("site-00" in r.sites for r in store.rounds(site="site-00"))
    assert [r.round for r in store.rounds(site="site-00")] == [2, 4, 6, 8, 10, 12]
    three = store.round(3)
    assert three is not None and [a.status for a in three.attempts] == ["aborted", "committed"]
    assert three.attempts[0].reason == "stage masked_input timed out"
    assert store.round(99) is None
    chain = store.lineage(built.versions[5][:10])
    assert [e.payload["version"] for e in chain] == built.versions[5::-1]
    assert chain[-1].kind == "model_genesis"
    spend = store.spend()
    assert spend["site-00"].budget == 10.0 and spend["site-01"].budget == 8.0
    assert spend["site-04"].rounds == [1, 3, 5, 7, 9, 11]
    assert spend["site-01"].rounds == list(range(1, 13))
    assert [k.key_id for k in store.keys()] == [signer.key_id]


# --- appends ------------------------------------------------------------------------------------


def test_append_is_idempotent_on_raft_index(backend: Backend, signer: AuditSigner) -> None:
    store = _store(backend, signer)
    payload = {"site": "a", "epsilon": 3.0, "delta": 1e-5}
    first = store.append("budget_changed", payload, 10)
    size = len(store)
    again = store.append("budget_changed", dict(reversed(list(payload.items()))), 10)
    assert again == first and len(store) == size
    with pytest.raises(AuditConflictError):
        store.append("budget_changed", {**payload, "epsilon": 4.0}, 10)
    with pytest.raises(AuditConflictError):
        store.append("client_revoked", {"site": "a"}, 10)
    store.append("client_revoked", {"site": "a"}, 12)
    with pytest.raises(AuditOrderError):
        store.append("client_revoked", {"site": "b"}, 11)
    assert len(store) == size + 1


def test_replay_after_restart_writes_nothing(backend: Backend, signer: AuditSigner) -> None:
    store = _store(backend, signer)
    build_log(store, rounds=4)
    before = [e.entry_hash for e in store.entries()]
    store.close()
    reopened = _store(backend, signer)
    build_log(reopened, rounds=4)  # the whole Raft log applied again
    assert [e.entry_hash for e in reopened.entries()] == before
    build_log(reopened, rounds=5)  # ... and one command more than before
    assert len(reopened) == len(before) + 2
    assert reopened.verify(genesis_key=signer.public_key).ok


def test_bad_input_changes_nothing(sqlite_backend: Backend, signer: AuditSigner) -> None:
    store = _store(sqlite_backend, signer)
    store.append("client_revoked", {"site": "a"}, 1)
    size = len(store)
    with pytest.raises(PayloadError):
        store.append("round_aborted", {"round": 1}, 2)
    with pytest.raises(ValueError):
        store.append("client_revoked", {"site": float("nan")}, 2)
    with pytest.raises(ValueError):
        store.append("client_revoked", {"site": "a"}, 0)
    with pytest.raises(PayloadError):
        store.append("genesis", {}, 2)
    assert len(store) == size


def test_read_only_store_refuses_to_write(sqlite_backend: Backend, signer: AuditSigner) -> None:
    _store(sqlite_backend, signer).append("client_revoked", {"site": "a"}, 1)
    reader = sqlite_backend.open(migrate=False)
    assert reader.append("client_revoked", {"site": "a"}, 1).seq == 1  # replay needs no key
    with pytest.raises(AuditKeyError):
        reader.append("client_revoked", {"site": "b"}, 2)


def test_concurrent_writers_serialise(backend: Backend, signer: AuditSigner) -> None:
    store = _store(backend, signer)
    commands = [("membership_changed", {"change": "add", "node": f"n{i}"}, i)
                for i in range(1, 41)]
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def replay() -> None:  # every thread applies the same commands, as a replay would
        try:
            results.append([store.append(*c).seq for c in commands])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=replay) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r == list(range(1, 41)) for r in results)
    assert len(store) == 41 and store.verify().ok


def test_key_rotation(backend: Backend, signer: AuditSigner, other_signer: AuditSigner) -> None:
    store = _store(backend, signer)
    build_log(store, rounds=3)
    rotation = store.rotate_key(other_signer, 500, reason="scheduled")
    assert rotation.key_id == signer.key_id  # signed by the key it replaces
    assert store.rotate_key(other_signer, 500, reason="scheduled") == rotation
    build_log(store, rounds=2, start_index=501)  # (re-uses round numbers; lineage restarts)
    store.close()
    # After a restart the store picks the key in force from the log itself.
    with pytest.raises(AuditKeyError):
        _store(backend, signer).append("client_revoked", {"site": "x"}, 900)
    store = _store(backend, signer, signers=[other_signer])
    last = store.append("client_revoked", {"site": "x"}, 901)
    assert last.key_id == other_signer.key_id
    report = store.verify(genesis_key=signer.public_key, check_lineage=False)
    assert report.ok, report.issues
    assert [k.key_id for k in report.keys] == [signer.key_id, other_signer.key_id]
    assert report.keys[1].from_seq == rotation.seq + 1
    assert report.counts["key_rotations"] == 1
    assert any(cp.key_id == other_signer.key_id for cp in store.checkpoints())
    # Pinning the rotated-to key as the genesis key must fail at the genesis.
    bad = store.verify(genesis_key=other_signer.public_key, check_lineage=False)
    assert not bad.ok and bad.first_bad_seq == 0


def test_writer_refuses_to_extend_a_damaged_log(backend: Backend, signer: AuditSigner) -> None:
    store = _store(backend, signer)
    build_log(store, rounds=3)
    store.close()
    store = _store(backend, signer)
    with backend.attacker(store) as conn:
        conn.execute(text("DELETE FROM audit_entries WHERE seq = 5"))
    with pytest.raises(AuditIntegrityError):
        store.append("client_revoked", {"site": "x"}, 999)


# --- append-only triggers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit_entries SET kind = 'x' WHERE seq = 1",
     "DELETE FROM audit_entries WHERE seq = 1",
     "TRUNCATE audit_entries",
     "UPDATE audit_checkpoints SET root_hash = 'x'",
     "DELETE FROM audit_checkpoints",
     "TRUNCATE audit_checkpoints"],
)
def test_triggers_reject_changes(backend: Backend, signer: AuditSigner, statement: str) -> None:
    if statement.startswith("TRUNCATE") and backend.name == "sqlite":
        pytest.skip("SQLite has no TRUNCATE")
    store = _store(backend, signer)
    build_log(store, rounds=2)
    before = len(store)
    with pytest.raises(DBAPIError, match="append-only"):
        with store.engine.begin() as conn:
            conn.execute(text(statement))
    assert len(store) == before and store.verify().ok


# --- tampering -------------------------------------------------------------------------------


def test_edited_payload_is_named(backend: Backend, signer: AuditSigner) -> None:
    store = _store(backend, signer)
    built = build_log(store)
    target = built.seq_of_round[4]
    with backend.attacker(store) as conn:
        payload = json.loads(_row(conn, target)["payload"])
        payload["metrics"]["accuracy"] = 0.99
        _set(conn, target, payload=canonical_text(payload))
    report = store.verify(genesis_key=signer.public_key)
    assert not report.ok and report.first_bad_seq == target
    assert "entry_hash" in (report.reason or "")
    assert [i.seq for i in report.issues] == [target]  # its successor still links


def test_edited_payload_with_recomputed_hash_is_named(
    backend: Backend, signer: AuditSigner
) -> None:
    store = _store(backend, signer)
    built = build_log(store)
    target = built.seq_of_round[7]
    with backend.attacker(store) as conn:
        row = _row(conn, target)
        payload = json.loads(row["payload"])
        payload["charges"] = {}  # hide the privacy charges of round 7
        new_hash = compute_entry_hash(target, row["kind"], payload, row["raft_index"],
                                      row["prev_hash"], row["key_id"])
        _set(conn, target, payload=canonical_text(payload), entry_hash=new_hash)
    report = store.verify(genesis_key=signer.public_key)
    assert not report.ok and report.first_bad_seq == target
    assert {i.check for i in report.issues} >= {"signature", "chain", "checkpoint"}


def test_deleted_row_is_named(backend: Backend, signer: AuditSigner) -> None:
    store = _store(backend, signer)
    built = build_log(store)
    target = built.seq_of_round[5]
    with backend.attacker(store) as conn:
        conn.execute(text("DELETE FROM audit_entries WHERE seq = :s"), {"s": target})
    report = store.verify(genesis_key=signer.public_key)
    assert not report.ok and report.first_bad_seq == target
    assert "missing" in (report.reason or "")


def test_deleted_and_renumbered_rows_are_named(backend: Backend, signer: AuditSigner) -> None:
    store = _store(backend, signer)
    built = build_log(store)
    target = built.seq_of_round[5]
    size = len(store)
    with backend.attacker(store) as conn:
        conn.execute(text("DELETE FROM audit_entries WHERE seq = :s"), {"s": target})
        for seq in range(target + 1, size):  # close the gap
            _set(conn, seq, seq=seq - 1)
    report = store.verify(genesis_key=signer.public_key)
    assert not report.ok and report.first_bad_seq == target


def test_swapped_rows_are_named(backend: Backend, signer: AuditSigner) -> None:
    store = _store(backend, signer)
    built = build_log(store)
    a, b = built.seq_of_round[2], built.seq_of_round[9]
    with backend.attacker(store) as conn:
        ra, rb = _row(conn, a), _row(conn, b)
        cols = [c for c in ra if c != "seq"]
        _set(conn, a, raft_index=-1)  # step aside for the unique raft_index
        _set(conn, b, **{c: ra[c] for c in cols})
        _set(conn, a, **{c: rb[c] for c in cols})
    report = store.verify(genesis_key=signer.public_key)
    assert not report.ok and report.first_bad_seq == a
    assert {i.seq for i in report.issues} >= {a, b}


@pytest.mark.parametrize("keep", [3, 12, 16])
def test_truncated_tail_below_a_checkpoint_is_named(
    backend: Backend, signer: AuditSigner, keep: int
) -> None:
    store = _store(backend, signer)
    build_log(store)
    assert len(store) > 2 * CP_EVERY
    with backend.attacker(store) as conn:
        conn.execute(text("DELETE FROM audit_entries WHERE seq >= :k"), {"k": keep})
    report = store.verify(genesis_key=signer.public_key)
    assert not report.ok and report.first_bad_seq == keep
    assert "tail deleted" in (report.reason or "")


def test_truncation_past_the_last_checkpoint_needs_a_known_size(
    backend: Backend, signer: AuditSigner
) -> None:
    store = _store(backend, signer)
    build_log(store)
    size = len(store)
    last_cp = store.checkpoints()[-1].tree_size
    assert last_cp < size
    with backend.attacker(store) as conn:
        conn.execute(text("DELETE FROM audit_entries WHERE seq >= :k"), {"k": last_cp})
    assert store.verify().ok  # undetectable from the log alone, by design
    report = store.verify(expected_size=size)
    assert not report.ok and report.first_bad_seq == last_cp


def test_foreign_signature_is_named(
    backend: Backend, signer: AuditSigner, other_signer: AuditSigner
) -> None:
    store = _store(backend, signer)
    built = build_log(store)
    target = built.seq_of_round[6]
    with backend.attacker(store) as conn:
        row = _row(conn, target)
        forged = other_signer.sign(ENTRY_CONTEXT + bytes.fromhex(row["entry_hash"])).hex()
        _set(conn, target, signature=forged)
    report = store.verify(genesis_key=signer.public_key)
    assert not report.ok and report.first_bad_seq == target
    assert [i.check for i in report.issues] == ["signature"]

    with backend.attacker(store) as conn:  # claiming the foreign key by id does not help
        _set(conn, target, key_id=other_signer.key_id)
    report = store.verify(genesis_key=signer.public_key)
    assert not report.ok and report.first_bad_seq == target


def test_whole_log_rewritten_under_a_new_key_fails_against_the_pinned_key(
    backend: Backend, signer: AuditSigner, other_signer: AuditSigner
) -> None:
    forged = _store(backend, other_signer)
    build_log(forged)
    assert forged.verify().ok  # self-consistent ...
    report = forged.verify(genesis_key=signer.public_key)
    assert not report.ok and report.first_bad_seq == 0  # ... but not by the cluster key


def test_replaced_blob_is_named(backend: Backend, signer: AuditSigner, tmp_path: Path) -> None:
    store = _store(backend, signer)
    built = build_log(store, blob_dir=tmp_path / "blobs")
    version = built.versions[8]
    path = tmp_path / "blobs" / version[:2] / version
    path.write_bytes(blob_bytes(8) + b"backdoor")
    report = store.verify(genesis_key=signer.public_key, blobs=tmp_path / "blobs")
    assert not report.ok and report.first_bad_seq == built.seq_of_round[8]
    assert "replaced" in (report.reason or "")
    path.unlink()
    report = store.verify(blobs=tmp_path / "blobs")
    assert report.first_bad_seq == built.seq_of_round[8] and "missing" in (report.reason or "")
    assert store.verify(blobs=tmp_path / "blobs", require_blobs=False).ok


def test_edited_checkpoint_is_reported(backend: Backend, signer: AuditSigner) -> None:
    store = _store(backend, signer)
    build_log(store)
    with backend.attacker(store) as conn:
        conn.execute(text("UPDATE audit_checkpoints SET root_hash = :r WHERE tree_size = :t"),
                     {"r": "00" * 32, "t": 2 * CP_EVERY})
    report = store.verify()
    assert not report.ok and report.bad_checkpoint == 2 * CP_EVERY
    assert report.first_bad_seq is None


def test_misrecorded_privacy_charge_is_named(backend: Backend, signer: AuditSigner) -> None:
    store = _store(backend, signer)
    built = build_log(store, accountant=toy_epsilon)
    assert store.verify(accountant=toy_epsilon).ok

    def stricter(history: Sequence[DPStep], delta: float) -> float:
        return toy_epsilon(history, delta) * (1.5 if history[-1].steps == 50 + 10 else 1.0)

    report = store.verify(accountant=stricter)
    assert not report.ok and report.first_bad_seq == built.seq_of_round[10]
    assert "recomputed" in (report.reason or "")


# --- canonical encoding through SQL ---------------------------------------------------------


def test_canonical_payloads_survive_sql(backend: Backend, signer: AuditSigner) -> None:
    store = _store(backend, signer)
    counter = iter(range(1, 10_000))

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.dictionaries(st.text(max_size=6), json_values, max_size=5))
    def check(payload: dict[str, Any]) -> None:
        written = store.append("property_test", payload, next(counter))
        read = store.get(written.seq)
        assert read is not None and read == written
        assert read.entry_hash == compute_entry_hash(
            read.seq, read.kind, read.payload, read.raft_index, read.prev_hash, read.key_id)

    check()
    assert store.verify(genesis_key=signer.public_key).ok


def test_logs_are_identical_across_nodes_and_databases(
    backend: Backend, signer: AuditSigner, tmp_path: Path
) -> None:
    """Deterministic signatures: two nodes applying the same commands agree hash for hash."""
    node_a = _store(backend, signer)
    build_log(node_a)
    node_b = AuditStore(f"sqlite:///{tmp_path / 'node-b.db'}", signer=signer,
                        checkpoint_every=CP_EVERY, genesis_info={"cluster": "test"})
    build_log(node_b)
    assert node_a.entries() == node_b.entries()
    assert node_a.checkpoints() == node_b.checkpoints()
    node_b.close()


def test_hash_helper_matches_store(sqlite_backend: Backend, signer: AuditSigner) -> None:
    store = _store(sqlite_backend, signer)
    e = store.append("model_genesis", {"version": hashlib.sha256(b"m").hexdigest(), "size": 1}, 3)
    assert e.entry_hash == hashlib.sha256(e.hash_preimage()).hexdigest()


def test_late_node_imports_a_peers_log(
    backend: Backend, signer: AuditSigner, other_signer: AuditSigner, tmp_path: Path
) -> None:
    """A node restored from a Raft snapshot copies the entries it never applied."""
    peer = AuditStore(f"sqlite:///{tmp_path / 'peer.db'}", signer=signer,
                      checkpoint_every=CP_EVERY, genesis_info={"cluster": "test"})
    build_log(peer, rounds=6)
    peer.rotate_key(other_signer, 900)
    peer.append("client_revoked", {"site": "site-03"}, 901)
    late = _store(backend, signer, signers=[other_signer])
    assert late.import_entries(peer.entries()) == len(peer)
    assert late.import_entries(peer.entries()) == 0  # idempotent
    assert late.entries() == peer.entries() and late.checkpoints() == peer.checkpoints()
    peer.append("client_revoked", {"site": "site-04"}, 902)
    late.append("client_revoked", {"site": "site-04"}, 902)  # then it applies commands itself
    assert late.entries() == peer.entries()
    assert late.verify(genesis_key=signer.public_key).ok

    forged = dataclasses.replace(peer.entries()[5], payload={"site": "evil"})
    fresh = AuditStore(f"sqlite:///{tmp_path / 'fresh.db'}", signer=signer)
    with pytest.raises(AuditIntegrityError, match="seq 5"):
        fresh.import_entries(peer.entries()[:5] + [forged])
    assert len(fresh) == 5
    stranger = AuditStore(f"sqlite:///{tmp_path / 'stranger.db'}", signer=other_signer)
    with pytest.raises(AuditIntegrityError, match="not this node's audit key"):
        stranger.import_entries(peer.entries())
    with pytest.raises(AuditConflictError):
        late.import_entries([dataclasses.replace(peer.entries()[3], entry_hash="0" * 64)])
    for s in (peer, fresh, stranger):
        s.close()


def test_parallel_signature_checks_agree(sqlite_backend: Backend, signer: AuditSigner,
                                         other_signer: AuditSigner) -> None:
    from coordinator.audit import verify_log

    store = _store(sqlite_backend, signer)
    build_log(store)
    entries = store.entries()
    entries[9] = dataclasses.replace(entries[9], signature=other_signer.sign(
        ENTRY_CONTEXT + bytes.fromhex(entries[9].entry_hash)).hex())
    serial = verify_log(entries, store.checkpoints())
    parallel = verify_log(entries, store.checkpoints(), workers=2)
    assert serial.first_bad_seq == parallel.first_bad_seq == 9
    assert serial.issues == parallel.issues and serial.counts == parallel.counts


def test_expected_seq_catches_skipped_commands(
    backend: Backend, signer: AuditSigner, tmp_path: Path
) -> None:
    peer = AuditStore(f"sqlite:///{tmp_path / 'peer.db'}", signer=signer,
                      checkpoint_every=CP_EVERY, genesis_info={"cluster": "test"})
    node = _store(backend, signer)
    commands = [("client_revoked", {"site": f"s{i}"}, 10 * i) for i in range(1, 8)]
    for seq, command in enumerate(commands, start=1):
        peer.append(*command, expected_seq=seq)
    node.append(*commands[0], expected_seq=1)
    node.append(*commands[1], expected_seq=2)
    # the node was down for seqs 3 and 4 and resumes from a Raft snapshot taken after them
    with pytest.raises(AuditGapError, match="next seq is 3"):
        node.append(*commands[4], expected_seq=5)
    assert len(node) == 3
    assert node.import_entries(peer.entries(3, 6)) == 3
    node.append(*commands[5], expected_seq=6)
    node.append(*commands[6], expected_seq=7)
    assert node.entries() == peer.entries()
    assert node.append(*commands[6], expected_seq=7).seq == 7  # replay
    with pytest.raises(AuditConflictError):
        node.append(*commands[6], expected_seq=6)
    peer.close()


def test_verify_while_a_node_appends(sqlite_backend: Backend, signer: AuditSigner) -> None:
    writer = _store(sqlite_backend, signer)
    build_log(writer, rounds=2)
    reader = sqlite_backend.open(migrate=False)
    stop = threading.Event()

    def keep_appending() -> None:
        i = 1000
        while not stop.is_set():
            i += 1
            writer.append("client_revoked", {"site": f"s{i}"}, i)

    thread = threading.Thread(target=keep_appending)
    thread.start()
    try:
        reports = [reader.verify() for _ in range(5)]
    finally:
        stop.set()
        thread.join()
    assert all(r.ok for r in reports), [r.reason for r in reports if not r.ok]
    assert reports[-1].counts["entries"] > reports[0].counts["entries"]
