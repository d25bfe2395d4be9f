"""Failover at every round stage (issue 6): SIGKILL the leader while it is planning, in
each SecAgg+ stage (advertise, share, masked, unmask) and just before the commit; the
new leader fences the old term, aborts the old attempt and runs the round again, the
sites follow, and the chain stays one version per round.

A test-only file (FEDRAFT_FAULT_HOLD) makes whichever node leads linger a few seconds
at the chosen stage, so the kill lands there every time instead of by luck.
"""

from __future__ import annotations

import time

import pytest

from coordinator.ops.admin_client import Refused, Unreachable

TASK = "breast_cancer"
SITES = [f"site-{i}" for i in range(3)]
CONFIG = {"fraction": 1.0, "min_clients": 3, "lr": 0.1, "compression": 4.0, "local_epochs": 1,
          "batch_size": 16, "collect_timeout_s": 20.0, "stage_timeout_s": 15.0,
          "online_wait_s": 15.0, "secure_aggregation": True, "clip": 0.5}
STAGES = ("planning", "advertise", "share", "masked", "unmask", "commit")
HOLD_S = 3.0


@pytest.fixture(scope="module")
def cluster(make_module_cluster):
    c = make_module_cluster("stages", sites=SITES, task=TASK, fault_hold=True)
    c.admin.call("Train", {"rounds": 1, "config": CONFIG})
    c.wait_round(1, timeout=90)
    return c


@pytest.mark.parametrize("stage", STAGES)
def test_leader_killed_at_stage_round_commits_once(cluster, stage):
    start = cluster.admin.round_status()
    target = start["last_round"] + 1
    cluster.hold(stage, HOLD_S)
    try:
        cluster.admin.call("Train", {"rounds": 1, "config": CONFIG})
        victim, progress = cluster.wait_stage(stage)
        assert progress["round"] == target
        killed_at = time.monotonic()
        cluster.kill_node(victim)
        new_leader = cluster.wait_leader(timeout=30, exclude=victim)
        election_s = time.monotonic() - killed_at
        cluster.hold(None)  # the new leader need not linger
        st = cluster.wait_round(target, timeout=90)
        commit_s = time.monotonic() - killed_at
    finally:
        cluster.hold(None)
    cluster.start_node(victim)

    assert new_leader != victim
    assert election_s < 10, election_s
    assert commit_s < 45, commit_s  # sites followed the new leader and the round finished
    versions = st["versions"]
    assert [v["round"] for v in versions] == list(range(len(versions)))
    assert len({v["hash"] for v in versions}) == len(versions)
    for prev, v in zip(versions, versions[1:], strict=False):
        assert v["parent"] == prev["hash"]
    history = st["history"][str(target)]
    committed = history["committed"]
    assert committed["version"] == versions[target]["hash"]
    assert len(committed["survivors"]) == len(SITES)
    if stage == "planning":
        # nothing was open yet: the new leader simply opens the round
        assert all(a["reason"] == "leader_change" for a in history["aborted"])
    else:
        assert committed["attempt"] >= 2
        assert any(a["reason"] == "leader_change" and a["attempt"] == progress["attempt"]
                   for a in history["aborted"]), history
    # the restarted node rejoins and agrees on the chain
    deadline = time.monotonic() + 30
    while True:
        try:
            mine = cluster.admin.round_status(endpoint=cluster.admin_of(victim))["versions"]
        except (Unreachable, Refused):
            mine = None
        if mine == versions:
            break
        assert time.monotonic() < deadline, "the restarted node did not catch up"
        time.sleep(0.3)
