"""What a node's audit writer records for applied commands: budget changes, and retries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coordinator.audit import AuditKeyError, AuditSigner
from coordinator.audit.entry import PayloadError, validate_payload
from coordinator.audit.store import open_readonly
from coordinator.audit.writer import AuditWriter, audit_record
from coordinator.core.state import apply, initial_state

KEY = "a" * 64


def _enrolled() -> dict[str, Any]:
    state = initial_state()
    assert apply(state, {"op": "enroll", "site": "site-a", "public_key": KEY,
                         "epsilon": 3.0, "delta": 1e-5})["ok"]
    return state


def _applied(state: dict[str, Any], command: dict[str, Any]) -> tuple[str, dict] | None:
    return audit_record(command, apply(state, command), state)


def test_budget_change_is_recorded() -> None:
    state = _enrolled()
    cmd = {"op": "set_budget", "site": "site-a", "epsilon": 5.0, "operator": "alice",
           "request_id": "r1"}
    record = _applied(state, cmd)
    assert record == ("budget_changed", {"site": "site-a", "epsilon": 5.0, "delta": 1e-5,
                                         "old_epsilon": 3.0, "old_delta": 1e-5,
                                         "spent": 0.0, "operator": "alice", "actor": "alice"})
    validate_payload(*record)  # what the store checks on append
    assert _applied(state, cmd) is None  # the retry is applied once, recorded once
    # nothing changed, or nothing applied: nothing recorded
    assert _applied(state, {"op": "set_budget", "site": "site-a", "epsilon": 5.0}) is None
    assert _applied(state, {"op": "set_budget", "site": "site-a", "epsilon": -1.0}) is None


def test_writer_puts_budget_changes_in_the_log(tmp_path: Path, signer: AuditSigner) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    writer = AuditWriter(url, signer)
    state = initial_state()
    commands = [
        {"op": "enroll", "site": "site-a", "public_key": KEY, "epsilon": 3.0, "delta": 1e-5,
         "request_id": "e1"},
        {"op": "enroll", "site": "site-a", "public_key": KEY, "epsilon": 3.0, "delta": 1e-5,
         "request_id": "e1"},  # a retry after a timeout
        {"op": "set_budget", "site": "site-a", "epsilon": 6.0, "delta": 1e-6,
         "operator": "alice", "request_id": "b1"},
        {"op": "set_budget", "site": "site-a", "epsilon": 6.0, "delta": 1e-6,
         "operator": "alice", "request_id": "b1"},
        {"op": "set_budget", "site": "site-a", "epsilon": 4.0, "request_id": "b2"},
    ]
    try:
        for cmd in commands:
            writer.record(cmd, apply(state, cmd), state)
    finally:
        writer.close()
    store = open_readonly(url)
    try:
        entries = store.entries()
        assert [e.kind for e in entries] == [
            "genesis", "client_enrolled", "budget_changed", "budget_changed"]
        assert [e.raft_index for e in entries[1:]] == [1, 3, 5]  # the state's apply seq
        first, second = entries[2].payload, entries[3].payload
        assert (first["old_epsilon"], first["epsilon"], first["delta"]) == (3.0, 6.0, 1e-6)
        assert first["operator"] == "alice" and "operator" not in second
        assert (second["old_epsilon"], second["epsilon"], second["old_delta"]) == (6.0, 4.0, 1e-6)
        assert store.verify(genesis_key=signer.public_key).ok
        assert store.spend()["site-a"].budget == 4.0  # the auditor's view follows the change
    finally:
        store.close()


BASE = "0" * 64
CHARGE = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10.0, "clip_norm": 1.0,
          "epsilon": 0.5, "delta": 1e-5, "epsilon_total": 0.5}
ABORTED = [  # site-a's attempt 1.1 aborted uncharged (its leader died), then charged late
    {"op": "genesis", "version": BASE, "size": 1, "holders": ["n1"], "cluster_size": 1},
    {"op": "claim", "term": 1, "node": "n1"},
    {"op": "train", "rounds": 1, "config": {"min_clients": 1, "secure_aggregation": False}},
    {"op": "round_open", "term": 1, "round": 1, "attempt": 1, "base": BASE,
     "participants": ["site-a"], "seed": "s"},
    {"op": "round_abort", "term": 1, "round": 1, "attempt": 1, "reason": "leader_change"},
]
LATE = {"op": "late_charge", "term": 1, "round": 1, "attempt": 1, "site": "site-a",
        "prior_charges": 0, "charge": CHARGE, "request_id": "l1"}


def test_late_charge_is_recorded_with_its_charge() -> None:
    state = _enrolled()
    for cmd in ABORTED:
        assert apply(state, cmd)["ok"]
    record = _applied(state, dict(LATE))
    assert record == ("charge_recorded", {"round": 1, "attempt": 1, "term": 1, "site": "site-a",
                                          "charges": {"site-a": CHARGE}, "overspent": False})
    validate_payload(*record)
    assert _applied(state, dict(LATE)) is None  # retried: recorded once
    with pytest.raises(PayloadError):
        validate_payload("charge_recorded", {**record[1], "charges": {"site-b": CHARGE}})


def test_writer_keeps_each_entry_as_applied(tmp_path: Path, signer: AuditSigner) -> None:
    """A late charge changes the aborted attempt's charges in the state; the abort's entry,
    still queued for the writer thread (as in a replay after a restart), must not change."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    writer = AuditWriter(url, signer)
    state = initial_state()
    try:
        for cmd in [{"op": "enroll", "site": "site-a", "public_key": KEY, "epsilon": 3.0,
                     "delta": 1e-5}, *ABORTED, dict(LATE)]:
            writer.record(cmd, apply(state, cmd), state)
    finally:
        writer.close()
    store = open_readonly(url)
    try:
        by_kind = {e.kind: e.payload for e in store.entries()}
        assert by_kind["round_aborted"]["charges"] == {}
        assert by_kind["charge_recorded"]["charges"] == {"site-a": CHARGE}
    finally:
        store.close()


def test_a_writer_refuses_another_clusters_log(tmp_path: Path) -> None:
    """A node whose audit database holds a log signed by another key would fail every append;
    it refuses to start on it instead, naming both keys. Its own log reopens fine."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    theirs, mine = AuditSigner.generate(), AuditSigner.generate()
    writer = AuditWriter(url, theirs)
    writer.store.ensure_genesis()
    writer.close()
    with pytest.raises(AuditKeyError) as exc:
        AuditWriter(url, mine)
    assert theirs.key_id in str(exc.value) and mine.key_id in str(exc.value)
    AuditWriter(url, theirs).close()


def test_a_quarantine_is_recorded_once_and_an_audit_head_not_at_all() -> None:
    from coordinator.core import commands

    state = _enrolled()
    cmd = commands.quarantine("site-a", "behind the invalid secure sums of round 4", 4, 3)
    record = _applied(state, cmd)
    assert record == ("client_quarantined", {"site": "site-a", "round": 4, "attempt": 3,
                                             "reason": "behind the invalid secure sums of round 4"})
    validate_payload(*record)
    assert _applied(state, cmd) is None  # the retry (same request id) is recorded once
    head = {"tree_size": 3, "root_hash": "b" * 64, "key_id": "0" * 16, "signature": "ab"}
    assert apply(state, commands.audit_head(head))["ok"]
    assert audit_record(commands.audit_head(head), {"ok": True}, state) is None


# ---------------------------------------------------------------- damage, and the rebuild

def _journal() -> list[dict[str, Any]]:
    """Commands as a Raft journal holds them: replaying them rebuilds the same log."""
    out = [{"op": "enroll", "site": f"site-{i}", "public_key": f"{i:x}" * 64, "epsilon": 3.0,
            "delta": 1e-5, "request_id": f"e{i}"} for i in range(8)]
    return out + [{"op": "revoke", "site": f"site-{i}", "request_id": f"r{i}"} for i in range(4)]


def _replay(writer: AuditWriter, commands: list[dict[str, Any]]) -> None:
    state = initial_state()
    for cmd in commands:
        writer.record(cmd, apply(state, cmd), state)


def _hashes(url: str) -> list[str]:
    store = open_readonly(url)
    try:
        return [e.entry_hash for e in store.entries()]
    finally:
        store.close()


def _delete(db: Path, where: str) -> None:
    import sqlite3

    with sqlite3.connect(db) as conn:
        for table in ("audit_entries", "audit_checkpoints"):
            conn.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")
        conn.execute(f"DELETE FROM audit_entries WHERE {where}")
        conn.execute("DELETE FROM audit_checkpoints")


def _wait_for(cond: Any, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_tail_cut_under_a_running_writer_is_named_and_healed_by_the_replay(
        tmp_path: Path, signer: AuditSigner, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "audit.db"
    url, journal = f"sqlite:///{db}", _journal()
    writer = AuditWriter(url, signer)
    _replay(writer, journal[:10])
    _wait_for(lambda: len(writer.store) == 11)
    whole = _hashes(url)
    _delete(db, "seq >= 7")  # behind the writer's back, checkpoints too
    _wait_for(lambda: writer.damage is not None)
    assert "11 were written (entries were deleted)" in writer.damage
    assert any(getattr(r, "event", "") == "audit_damaged" for r in caplog.records)
    _replay(writer, journal[:12])  # what arrives next is not written onto a damaged log
    writer.close()
    assert _hashes(url) == whole[:7]
    # the restart: the shorter log checks out, and the journal's replay writes the rest,
    # entry for entry what it was (and then the two newer commands)
    writer = AuditWriter(url, signer)
    try:
        assert writer.damage is None
        _replay(writer, journal)
        _wait_for(lambda: len(writer.store) == 13)
    finally:
        writer.close()
    assert _hashes(url)[:11] == whole


def test_a_log_with_a_hole_is_set_aside_and_rebuilt(tmp_path: Path, signer: AuditSigner,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "audit.db"
    url, journal = f"sqlite:///{db}", _journal()
    writer = AuditWriter(url, signer)
    _replay(writer, journal)
    _wait_for(lambda: len(writer.store) == 13)
    writer.close()
    whole = _hashes(url)
    _delete(db, "seq = 4")
    writer = AuditWriter(url, signer)  # a start: the hole is named, the file moved aside
    try:
        assert len(writer.store) == 0
        _replay(writer, journal)
        _wait_for(lambda: len(writer.store) == 13)
    finally:
        writer.close()
    assert _hashes(url) == whole
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith("audit.db.damaged-")]
    assert aside and any("damaged at seq 4" in r.getMessage() and str(tmp_path) in r.getMessage()
                         for r in caplog.records)


def test_a_damaged_database_it_cannot_move_is_refused(tmp_path: Path) -> None:
    from coordinator.audit.writer import AuditDamaged, _set_aside

    with pytest.raises(AuditDamaged, match="damaged .gap.; restore it"):
        _set_aside("postgresql://u@db.example/audit", "gap")


def test_entries_name_the_operator_and_keep_the_whole_round_config() -> None:
    from coordinator.core import commands

    state = initial_state()
    assert apply(state, {"op": "genesis", "version": "0" * 64, "size": 1, "holders": ["n1"],
                         "cluster_size": 1})["ok"]
    enroll = commands.enroll("site-a", KEY, operator="alice")
    assert _applied(state, enroll)[1]["operator"] == "alice"
    assert apply(state, commands.enroll("site-b", "b" * 64))["ok"]
    train = commands.train(2, {"secure_aggregation": True, "compression": 4.0},
                           operator="alice")
    kind, payload = _applied(state, train)
    assert kind == "training_requested" and payload["operator"] == "alice"
    assert payload["config"]["secure_aggregation"] is True
    assert payload["config"]["compression"] == 4.0
    from coordinator.audit.writer import config_digest

    assert payload["config_digest"] == config_digest(payload["config"])
    revoked = _applied(state, commands.revoke("site-b", operator="bob"))
    assert revoked == ("client_revoked", {"site": "site-b", "operator": "bob", "actor": "bob"})
    # the node that submitted a command, and when, ride on the command into the entry
    stamped = commands.revoke("site-a") | {"submitted_by": "n2", "time": "2026-12-07T10:00:00.000Z"}
    assert _applied(state, stamped) == ("client_revoked", {
        "site": "site-a", "actor": "node:n2", "time": "2026-12-07T10:00:00.000Z"})
    # a malformed actor is refused like any malformed field, and changes nothing
    assert not apply(state, commands.revoke("site-a", operator="x" * 500))["ok"]
