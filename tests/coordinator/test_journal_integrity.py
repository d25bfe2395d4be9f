"""A damaged Raft journal or term file is named and never replayed; a peer cannot push an
unbounded term; the node comes back with `fedraft node recover`.

Journals here are written by real replicas (pysyncobj's own file format), then damaged
the ways a bad disk or a careless hand does it.
"""

from __future__ import annotations

import os
import pickle
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.cluster.journal_check import (
    FIRST_RECORD_OFFSET,
    MAX_TERM,
    JournalDamaged,
    check_raft_dir,
)
from coordinator.cluster.raft_patches import message_out_of_bounds
from coordinator.cluster.replica import Replica
from coordinator.core import commands
from coordinator.demo.cluster import LocalCluster, free_ports

from .conftest import fedraft_cli as _fedraft


def _wait(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _replica(path: Path, port: int) -> Replica:
    return Replica(f"127.0.0.1:{port}", [], path, "x" * 24, (0.3, 0.6),
                   on_applied=lambda *_: None)


def _stop(replica: Replica) -> None:
    replica.sync.destroy_synchronous()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-node replica's journal holding 30 enrollments, closed cleanly."""
    path = tmp_path_factory.mktemp("journal")
    replica = _replica(path, free_ports(1)[0])
    try:
        _wait(replica.is_leader)
        for i in range(30):
            assert replica.submit(commands.enroll(f"s{i}", f"{i:064x}"))["ok"]
    finally:
        _stop(replica)
    return path


def _copy(written: Path, tmp_path: Path) -> Path:
    shutil.copytree(written, tmp_path / "raft")
    return tmp_path / "raft"


def _records_end(journal: Path) -> int:
    return int.from_bytes(journal.read_bytes()[36:40], "little")


def _flip(journal: Path, at: int) -> None:
    data = bytearray(journal.read_bytes())
    data[at] ^= 0x5A
    journal.write_bytes(bytes(data))


def test_an_intact_journal_checks_out_and_replays(written: Path, tmp_path: Path) -> None:
    raft = _copy(written, tmp_path)
    assert len(check_raft_dir(raft / "raft.journal")) >= 31
    replica = _replica(raft, free_ports(1)[0])
    try:
        _wait(lambda: replica.state.read(lambda s: len(s["sites"])) == 30)
    finally:
        _stop(replica)
    assert len(check_raft_dir(raft / "raft.journal")) >= 31  # sums kept up on restart


def _edit_command(journal: Path) -> None:
    """Flip a byte inside the command of the record in the middle of the journal (not its
    length, index or term: those fail the framing check, which names them otherwise)."""
    data, end = journal.read_bytes(), _records_end(journal)
    starts, at = [], FIRST_RECORD_OFFSET
    while at < end:
        starts.append(at)
        at += int.from_bytes(data[at:at + 4], "little") + 8
    _flip(journal, starts[len(starts) // 2] + 4 + 16 + 2)


def _overwrite_start(fill: bytes) -> Callable[[Path], None]:
    def damage(journal: Path) -> None:
        data = bytearray(journal.read_bytes())
        data[:64] = fill * (64 // len(fill)) if len(fill) < 64 else fill[:64]
        journal.write_bytes(bytes(data))
    return damage


def _truncate(journal: Path) -> None:
    os.truncate(journal, _records_end(journal) // 2)


def _garble_length(journal: Path) -> None:
    _flip(journal, FIRST_RECORD_OFFSET + 1)


def _meta(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(journal: Path) -> None:
        meta_path = journal.with_name("raft.journal.meta")
        meta = pickle.loads(meta_path.read_bytes())
        meta_path.write_bytes(pickle.dumps(change(meta)))
    return damage


def _unbounded_term(meta: dict) -> dict:
    meta["currentTerm"] = 2**64 - 1
    meta.pop("fedraft_sum", None)  # written by hand: no checksum at all
    return meta


@pytest.mark.parametrize(("damage", "named"), [
    (_edit_command, "does not match its checksum"),
    (_overwrite_start(b"\xff"), "header"),
    (_overwrite_start(os.urandom(64)), "header"),
    (_truncate, "outside the file"),
    (_garble_length, "record 1"),
    (_meta(lambda m: {**m, "currentTerm": m["currentTerm"] + 5}), "does not match its checksum"),
    (_meta(_unbounded_term), "out of bounds"),
    (lambda j: j.with_name("raft.journal.meta").write_bytes(b"\x80\x04garbage"), "unreadable"),
], ids=["edited", "0xff_start", "random_start", "truncated", "garbled_length", "edited_term",
        "term_2_64", "garbled_term_file"])
def test_damage_is_named_and_the_replica_never_starts(written: Path, tmp_path: Path, damage,
                                                     named: str) -> None:
    raft = _copy(written, tmp_path)
    damage(raft / "raft.journal")
    with pytest.raises(JournalDamaged, match=named):
        check_raft_dir(raft / "raft.journal")
    with pytest.raises(JournalDamaged):
        _replica(raft, free_ports(1)[0])  # no vote, no lead, nothing served


def test_a_peer_cannot_push_an_unbounded_term() -> None:
    assert message_out_of_bounds({"type": "request_vote", "term": 2**64}) is not None
    assert message_out_of_bounds({"type": "append_entries", "term": 3, "prevLogIdx": -1})
    assert message_out_of_bounds({"type": "append_entries", "term": 3,
                                  "entries": [(b"x", 5, MAX_TERM + 1)]})
    assert message_out_of_bounds({"type": "append_entries", "term": 3, "commit_index": 2.5})
    assert message_out_of_bounds({"type": "append_entries", "term": 3, "prevLogIdx": 4,
                                  "prevLogTerm": 2, "entries": [(b"x", 5, 3)],
                                  "commit_index": 4}) is None
    assert message_out_of_bounds({"type": "fedraft_keepalive"}) is None


def test_an_unbounded_term_from_a_peer_changes_nothing(tmp_path: Path) -> None:
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    replicas = [Replica(a, [b for b in addrs if b != a], tmp_path / f"n{i}", "x" * 24,
                        (0.5, 1.0), on_applied=lambda *_: None) for i, a in enumerate(addrs)]
    try:
        _wait(lambda: any(r.is_leader() for r in replicas))
        leader = next(r for r in replicas if r.is_leader())
        follower = next(r for r in replicas if r is not leader)
        term = follower.term()
        node = next(iter(follower.sync._SyncObj__otherNodes))
        handle = follower.sync._SyncObj__transport._onMessageReceivedCallback
        for message in ({"type": "request_vote", "term": 2**64 + 5, "last_log_index": 1,
                         "last_log_term": 1},
                        {"type": "append_entries", "term": 2**63, "commit_index": 0}):
            follower._on_tick_thread(lambda m=message: handle(node, m), 5.0)
        assert follower.term() == term
        assert leader.submit(commands.enroll("after", "e" * 64))["ok"]
        _wait(lambda: all(r.state.read(lambda s: "after" in s["sites"]) for r in replicas))
    finally:
        for r in replicas:
            r.destroy()



def test_a_node_with_a_damaged_journal_refuses_and_recovers_from_its_peers(tmp_path: Path):
    cluster = LocalCluster(tmp_path / "c", num_nodes=3, election=(0.6, 1.2))
    cluster.start_nodes()
    try:
        cluster.wait_leader(30)
        for i in range(10):
            cluster.add_site(f"site-{i}")
        victim = next(n.id for n in cluster.nodes if n.id != cluster.wait_leader())
        _wait(lambda: (cluster.status(victim) or {}).get("state", {}).get("sites") == 10)
        cluster.node_procs[victim].stop()
        journal = tmp_path / "c" / victim / "data" / "raft" / "raft.journal"
        _edit_command(journal)
        cluster.start_node(victim)
        proc = cluster.node_procs[victim].popen
        assert proc.wait(60) == 5
        log = (tmp_path / "c" / victim / "node.log").read_text()
        assert "Raft journal is damaged" in log and "does not match its checksum" in log
        cluster.add_site("while-down")  # the majority goes on meanwhile
        config = str(tmp_path / "c" / victim / "node.toml")
        recovered = _fedraft(cluster, "node", "recover", "--config", config, "--json")
        assert recovered.returncode == 0, recovered.stderr
        assert "checksum" in recovered.stdout
        assert _fedraft(cluster, "node", "recover", "--config", config).returncode == 1
        cluster.start_node(victim)
        _wait(lambda: (cluster.status(victim) or {}).get("state", {}).get("sites") == 11, 60)
    finally:
        cluster.stop()
