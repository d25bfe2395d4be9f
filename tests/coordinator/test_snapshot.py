"""Raft log compaction (issue 16): fedraft's durable snapshots, the journal trim, and a
crash at every step of it, on real pysyncobj replicas in real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pysyncobj.node import TCPNode

from coordinator import wire
from coordinator.audit.store import open_readonly
from coordinator.cluster import snapshot
from coordinator.cluster.journal_check import JournalDamaged, check_raft_dir, scan
from coordinator.cluster.replica import Replica
from coordinator.cluster.snapshot import CompactionPolicy, compaction_due
from coordinator.demo.cluster import LocalCluster
from tests.coordinator.conftest import Factory, free_port, wait_single_leader

ROOT = Path(__file__).resolve().parents[2]


def _snap() -> snapshot.Snapshot:
    return snapshot.Snapshot({"seq": 7, "sites": {"a": 1}, "history": {3: [1.5, None, b"z"]}},
                             (b"x", 12, 3), (b"y", 11, 3), {TCPNode("127.0.0.1:7100")},
                             audit_through=5)


def test_a_snapshot_reads_back_and_names_damage() -> None:
    data = snapshot.encode(_snap())
    back = snapshot.decode(data)
    assert back == _snap()
    assert [n.address for n in back.cluster] == ["127.0.0.1:7100"]
    assert snapshot.read_header(data) == (11, 3, 12, 3)
    with pytest.raises(TypeError):  # state that is not plain data is refused, not pickled
        snapshot.encode(snapshot.Snapshot({"seq": (1, 2)}, (b"x", 2, 1), (b"y", 1, 1), set()))
    flipped = bytearray(data)
    flipped[-3] ^= 1
    with pytest.raises(JournalDamaged, match="checksum"):
        snapshot.decode(bytes(flipped))
    with pytest.raises(JournalDamaged, match="not a fedraft snapshot"):
        snapshot.decode(data[:20])


@pytest.mark.parametrize(("entries", "size", "idle", "behind", "due"), [
    (10, 100, True, False, False),           # not yet
    (5_000, 100, True, False, True),         # enough entries
    (10, 64 << 20, True, False, True),       # enough bytes
    (5_000, 100, False, False, False),       # the audit writer is behind
    (5_000, 100, True, True, False),         # a follower still needs the entries
    (19_999, 100, True, True, False),        # under 4x entries: still waits
    (20_000, 100, True, True, True),         # 4x entries: waits for no follower
    (10, 256 << 20, True, True, True),       # 256 MiB: waits for no follower
    (20_000, 256 << 20, False, True, False),  # but always for the audit writer
])
def test_when_a_compaction_is_due(entries: int, size: int, idle: bool, behind: bool,
                                  due: bool) -> None:
    assert compaction_due(CompactionPolicy(), entries, size, idle, behind) is due


def test_compaction_bounds_the_journal_and_a_restart_keeps_every_write(tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    policy = CompactionPolicy(entries=20)
    rep = Replica(addr, [], tmp_path, "pw", (0.2, 0.4), lambda *a: None, compaction=policy)
    try:
        wait_single_leader(rep)
        for i in range(90):
            rep.submit({"op": "barrier", "request_id": f"r{i}"})
        time.sleep(0.3)
        entries, _ = rep.journal_size()
        assert entries < 25, f"journal holds {entries} entries: never compacted"
    finally:
        rep.destroy()
    records = check_raft_dir(tmp_path / "raft.journal")
    assert records[0].index > 60  # trimmed: the snapshot holds the rest
    rep = Replica(addr, [], tmp_path, "pw", (0.2, 0.4), lambda *a: None, compaction=policy)
    try:
        wait_single_leader(rep)
        held = rep.state.read(lambda s: [f"r{i}" in s["requests"] for i in range(90)])
        assert all(held)
        assert rep.submit({"op": "barrier", "request_id": "r5"}).get("replayed") is True
    finally:
        rep.destroy()


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from coordinator.cluster.replica import Replica
    from coordinator.cluster.snapshot import CompactionPolicy
    rep = Replica(sys.argv[1], [], Path(sys.argv[2]), "pw", (0.2, 0.4), lambda *a: None,
                  compaction=CompactionPolicy(entries=15))
    while not rep.is_leader():
        time.sleep(0.02)
    for i in range(200):
        rep.submit({"op": "barrier", "request_id": f"w{sys.argv[3]}-{i}"})
        print(f"w{sys.argv[3]}-{i}", flush=True)  # acknowledged
    rep.destroy()
""")


@pytest.mark.parametrize("step", ["snapshot written", "snapshot in place", "journal trimmed"])
def test_a_crash_at_each_step_of_a_compaction_loses_no_acknowledged_write(
        tmp_path: Path, step: str) -> None:
    """A writer process dies (as SIGKILL would end it) at `step` of a compaction; the node
    that restarts on its files holds every write the dead one acknowledged, and later
    compactions go on."""
    addr = f"127.0.0.1:{free_port()}"
    env = {**os.environ, snapshot.CRASH_POINTS_ENV: f"0.5@{step}", "PYTHONPATH": str(ROOT)}
    acked: list[str] = []
    for life in range(3):
        proc = subprocess.run([sys.executable, "-c", WRITER, addr, str(tmp_path), str(life)],
                              env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == snapshot.CRASH_EXIT, proc.stderr[-2000:]
        assert f"crash point: exiting at {step}" in proc.stderr
        acked += proc.stdout.split()
    assert len(acked) > 10
    records = scan((tmp_path / "raft.journal").read_bytes())
    assert snapshot.check_snapshot(tmp_path, records[0].index) is not None
    rep = Replica(addr, [], tmp_path, "pw", (0.2, 0.4), lambda *a: None)
    try:
        wait_single_leader(rep)
        missing = rep.state.read(lambda s: [w for w in acked if w not in s["requests"]])
        assert missing == []
    finally:
        rep.destroy()


def test_a_damaged_snapshot_or_a_gap_stops_the_node(tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    rep = Replica(addr, [], tmp_path, "pw", (0.2, 0.4), lambda *a: None,
                  compaction=CompactionPolicy(entries=10))
    try:
        wait_single_leader(rep)
        for i in range(30):
            rep.submit({"op": "barrier", "request_id": f"r{i}"})
        time.sleep(0.3)
    finally:
        rep.destroy()
    dump = tmp_path / snapshot.SNAPSHOT_NAME
    good = dump.read_bytes()
    dump.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    with pytest.raises(JournalDamaged, match="snapshot raft.dump does not match its checksum"):
        Replica(addr, [], tmp_path, "pw", (0.2, 0.4), lambda *a: None)
    dump.unlink()
    with pytest.raises(JournalDamaged, match="snapshot that holds the entries before it is missing"):
        Replica(addr, [], tmp_path, "pw", (0.2, 0.4), lambda *a: None)
    dump.write_bytes(good)
    assert json.dumps(snapshot.check_snapshot(tmp_path, None))  # whole again


def _enroll(cluster: LocalCluster, count: int, prefix: str) -> None:
    for i in range(count):
        key = Ed25519PrivateKey.generate()
        cluster.admin.call("Enroll", {"site": f"{prefix}-{i:04d}",
                                      "public_key": wire.public_key_hex(key)})


def _audit_head(cluster: LocalCluster, node_id: str) -> tuple[int, str | None]:
    store = open_readonly(cluster.audit_db(node_id))
    try:
        head = store.head()
        return len(store), head.entry_hash if head else None
    finally:
        store.close()


def test_a_follower_that_gets_the_leaders_snapshot_copies_the_audit_entries_it_missed(
        make_cluster: Factory) -> None:
    """A follower down while the leader compacts past it (the leader waits for it, then
    gives up at 4x the threshold) gets the leader's snapshot instead of the entries; its
    audit log, lost meanwhile, then copies the missing entries from a peer, checked one by
    one, and ends identical to the leader's."""
    cluster = make_cluster(snapshot_entries=10, genesis=False)
    leader = cluster.wait_leader(30)
    follower = next(n.id for n in cluster.nodes if n.id != leader)
    _enroll(cluster, 5, "before")
    cluster.kill_node(follower)
    _enroll(cluster, 60, "while-down")  # past 4 x 10 entries: the leader compacts anyway
    # and its audit log is lost meanwhile: the catch-up starts from an empty log
    for part in (cluster.root / follower / "data").glob("audit.db*"):
        part.unlink()
    cluster.start_node(follower)
    deadline = time.monotonic() + 90
    while True:
        status = cluster.status(follower)
        if (status is not None and status["state"]["sites"] == 65
                and _audit_head(cluster, follower) == _audit_head(cluster, leader)):
            break
        assert time.monotonic() < deadline, (status, _audit_head(cluster, follower),
                                             _audit_head(cluster, leader))
        time.sleep(0.5)
    assert status["audit_damaged"] is None
    log = (cluster.root / follower / "node.log").read_text()
    assert "copied" in log and "entries from a peer" in log
