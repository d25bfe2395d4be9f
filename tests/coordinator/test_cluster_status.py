"""`fedraft cluster status` says when the cluster is degraded, in its exit status too."""

from __future__ import annotations

import json
import subprocess
import sys

from coordinator.demo.cluster import LocalCluster


def _status(c: LocalCluster, *extra: str) -> subprocess.CompletedProcess:
    op = c.operator
    return subprocess.run(
        [sys.executable, "-m", "coordinator", "cluster", "status", "--admin",
         ",".join(n.admin for n in c.nodes), "--ca", str(op.ca), "--cert", str(op.cert),
         "--key", str(op.key), *extra], capture_output=True, text=True, timeout=60)


def test_status_exits_1_and_names_a_member_that_is_down(make_cluster) -> None:
    c = make_cluster(genesis=False)
    leader = c.wait_leader(30)
    ok = _status(c, "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["healthy"] is True
    victim = next(n.id for n in c.nodes if n.id != leader)
    c.kill_node(victim)
    down = _status(c, "--json")
    assert down.returncode == 1, down.stderr
    report = json.loads(down.stdout)
    assert report["healthy"] is False
    assert [n["id"] for n in report["nodes"] if not n["reachable"]] == [victim]
    table = _status(c)
    assert table.returncode == 1
    assert f"degraded: unreachable: {victim}" in table.stderr
