"""Followers truncate their Raft log only on a term conflict (Raft 5.3), never an
acknowledged or applied entry: the pure plan against a reference, then a stale
AppendEntries replayed into a real pysyncobj follower of a running cluster."""

from __future__ import annotations

import time
from pathlib import Path

from hypothesis import assume, given
from hypothesis import strategies as st

from coordinator.cluster.raft_patches import plan_append
from coordinator.cluster.replica import Replica
from coordinator.core import commands
from coordinator.demo.cluster import free_ports

TERMS = st.lists(st.integers(1, 4), min_size=1, max_size=10).map(sorted)


def _raft(local: list[int], prev: int, entries: list[tuple[None, int, int]]) -> list[int]:
    """The follower's log after the message, as Raft 5.3 states it (index i is local[i])."""
    log = list(local)
    for _, index, term in entries:
        if index < len(log) and log[index] != term:
            del log[index:]
        if index == len(log):
            log.append(term)
    return log


@given(TERMS, TERMS, st.data())
def test_plan_is_raft_and_keeps_every_matching_entry(local: list[int], leader: list[int],
                                                      data: st.DataObject) -> None:
    local, leader = [0, *local], [0, *leader]  # index 0: the entry every log starts with
    prev = data.draw(st.integers(0, len(leader) - 1))
    assume(prev < len(local) and local[prev] == leader[prev])
    count = data.draw(st.integers(0, len(leader) - 1 - prev))
    entries = [(None, i, leader[i]) for i in range(prev + 1, prev + 1 + count)]

    def term_at(i: int) -> int | None:
        return local[i] if 0 <= i < len(local) else None

    plan = plan_append(prev, leader[prev], entries, term_at)
    log = list(local)
    if plan.truncate_from is not None:
        del log[plan.truncate_from:]
    assert not plan.entries or plan.entries[0][1] == len(log)  # appended right after the log
    log += [term for _, _, term in plan.entries]
    assert log == _raft(local, prev, entries)
    if plan.truncate_from is None:  # nothing conflicted: the follower lost nothing
        assert log[: len(local)] == local
    assert term_at(plan.prev_idx) == plan.prev_term


def _wait(check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_stale_append_entries_drops_nothing_acknowledged(tmp_path: Path) -> None:
    ports = free_ports(3)
    addrs = [f"127.0.0.1:{p}" for p in ports]
    replicas = [Replica(a, [b for b in addrs if b != a], tmp_path / f"n{i}", "x" * 24,
                        (0.5, 1.0), on_applied=lambda *_: None)
                for i, a in enumerate(addrs)]
    try:
        _wait(lambda: any(r.is_leader() for r in replicas))
        leader = next(r for r in replicas if r.is_leader())
        for i in range(30):
            assert leader.submit(commands.enroll(f"s{i}", f"{i:064x}"))["ok"]
        follower = next(r for r in replicas if r is not leader)
        journal = follower.sync._SyncObj__raftLog
        _wait(lambda: journal[-1][1] >= leader.sync._SyncObj__raftLog[-1][1])
        _wait(lambda: follower.sync._SyncObj__raftLastApplied >= journal[-1][1])
        before = [(e[1], e[2]) for e in journal]
        applied = follower.sync._SyncObj__raftLastApplied
        # what the leader sent a while ago: an entry the follower has held and applied since
        prev = journal[-10]
        stale = {"type": "append_entries", "term": leader.term(), "prevLogIdx": prev[1],
                 "prevLogTerm": prev[2], "entries": [journal[-9]],
                 "commit_index": prev[1]}
        node = next(n for n in follower.sync._SyncObj__otherNodes
                    if n.address == leader.self_addr)
        handle = follower.sync._SyncObj__transport._onMessageReceivedCallback
        follower._on_tick_thread(lambda: handle(node, stale), 5.0)
        assert [(e[1], e[2]) for e in journal] == before  # pysyncobj alone dropped 8 entries
        assert follower.sync._SyncObj__raftLastApplied == applied
        assert leader.submit(commands.enroll("late", "f" * 64))["ok"]
        _wait(lambda: all(r.state.read(lambda s: "late" in s["sites"]) for r in replicas))
        states = [r.state.read(lambda s: s["sites"]) for r in replicas]
        assert states[0] == states[1] == states[2] and len(states[0]) == 31
    finally:
        for r in replicas:
            r.destroy()
