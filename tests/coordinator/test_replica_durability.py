"""The Raft journal reaches the disk before an entry is acknowledged (issue 6, crash
safety), checked on a real single-node pysyncobj replica."""

from __future__ import annotations

from pathlib import Path

from coordinator.cluster.replica import Replica
from tests.coordinator.conftest import free_port, wait_single_leader


def test_every_append_is_synced_and_survives_a_restart(tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    rep = Replica(addr, [], tmp_path, "pw", (0.2, 0.4), lambda *a: None)
    try:
        wait_single_leader(rep)
        journal = rep.sync._SyncObj__raftLog
        synced: list[int] = []
        add = journal.add  # the durable wrapper: count the syncs it makes
        real_flush = journal._FileJournal__journalFile.flush

        def counting_flush() -> None:
            synced.append(len(journal))
            real_flush()

        journal._FileJournal__journalFile.flush = counting_flush
        assert add.__name__ == "durable_add"
        before = len(journal)
        for i in range(5):
            rep.submit({"op": "barrier", "request_id": f"r{i}"})
        assert len(journal) - before >= 5
        # one sync per appended entry, each after the entry was in the journal
        assert len(synced) >= 5 and synced == sorted(synced)
        assert (tmp_path / "raft.journal.meta").exists()
    finally:
        rep.destroy()
    # a fresh process-equivalent reading the same files sees every acknowledged command
    rep2 = Replica(addr, [], tmp_path, "pw", (0.2, 0.4), lambda *a: None)
    try:
        wait_single_leader(rep2)
        assert rep2.state.read(lambda s: "r3" in s["requests"])
        again = rep2.submit({"op": "barrier", "request_id": "r3"})
        assert again.get("replayed") is True  # deduplicated: r3 was applied before the restart
    finally:
        rep2.destroy()
