"""Issue 4: a leader SIGKILLed while it holds the sites' privatized updates (SecAgg+ unmask
stage) leaves its attempt aborted with no charges, though every site's own accountant
charged the run (write-ahead). The sites keep reporting the run as unsettled, the new
leader charges it late on the aborted attempt, and then each site's ledger spend equals
its own accountant's epsilon, and `fedraft audit verify` recomputes every charge, the
late ones included, on every node's log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from coordinator.demo.cluster import LocalCluster
from coordinator.ops.admin_client import Refused, Unreachable
from privacy.accounting import DPStep, epsilon_spent

TASK = "breast_cancer"
SITES = [f"late-{i}" for i in range(3)]
PRIVACY = {"epsilon": 3.0, "delta": 1e-5, "planned_rounds": 5, "clip_norm": 1.0}
CONFIG = {"fraction": 1.0, "min_clients": 3, "lr": 0.1, "compression": 4.0, "local_epochs": 1,
          "batch_size": 16, "collect_timeout_s": 30.0, "stage_timeout_s": 15.0,
          "online_wait_s": 15.0, "secure_aggregation": True, "clip": 0.5}
HOLD_S = 4.0


def _until(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except (Unreachable, Refused):
            got = None
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _site_file(c: LocalCluster, site: str, name: str) -> dict[str, Any]:
    return json.loads((c.root / "sites" / site / "state" / name).read_text())


def test_leader_killed_holding_updates_sites_are_charged_late(make_cluster) -> None:
    c = make_cluster(sites=SITES, task=TASK, budget=(PRIVACY["epsilon"], PRIVACY["delta"]),
                     privacy=PRIVACY, fault_hold=True)
    c.hold("unmask", HOLD_S)
    c.admin.call("Train", {"rounds": 1, "config": CONFIG})
    victim, progress = c.wait_stage("unmask", timeout=90)
    c.kill_node(victim)
    c.wait_leader(timeout=30, exclude=victim)
    c.hold(None)
    c.wait_round(1, timeout=120)

    # the killed attempt is aborted for the leader change and charged late, site by site
    def late_charged() -> dict[str, Any] | None:
        history = c.admin.round_status()["history"]["1"]
        killed = next(a for a in history["aborted"] if a["attempt"] == progress["attempt"])
        return killed if set(killed["charges"]) == set(SITES) else None

    killed = _until("the late charges", late_charged)
    assert killed["reason"] == "leader_change"
    st = c.admin.round_status()
    assert st["history"]["1"]["committed"]["attempt"] > progress["attempt"]

    # each site's ledger equals its own accountant: same runs, same epsilon
    ledger = {s["site"]: s for s in c.admin.all_sites(charges=True)}
    for site in SITES:
        own = _site_file(c, site, "dp-accountant.json")
        runs = [DPStep.from_dict(d) for d in own["history"]]
        rec = ledger[site]
        assert len(runs) == len(rec["charges"]) == 2, (site, own["history"], rec["charges"])
        # the late charge may land before or after the retry's commit: either order
        assert sorted((x["round"], x["attempt"]) for x in rec["charges"]) == [
            (1, progress["attempt"]), (1, st["history"]["1"]["committed"]["attempt"])]
        mine = epsilon_spent(runs, PRIVACY["delta"])
        assert abs(mine - rec["spent"]) <= 1e-9 * mine, (site, mine, rec["spent"])
        assert rec["spent"] <= PRIVACY["epsilon"]
        # and the site, told so, has nothing left unsettled
        _until(f"{site} to settle", lambda s=site: _site_file(
            c, s, "agent-state.json").get("unsettled") == [])

    # every node's audit log (the killed one restarted) recomputes every charge
    c.start_node(victim)
    for n in c.nodes:
        _until(f"{n.id}'s audit log", lambda n=n: _audit(c, n.id, charges=False)[
            "counts"]["charges_unchecked"] == 2 * len(SITES))
        report = _audit(c, n.id, charges=True)
        assert report["ok"] and report["counts"]["charges"] == 2 * len(SITES), (n.id, report)


def _audit(c: LocalCluster, node_id: str, charges: bool) -> dict[str, Any]:
    """`fedraft audit verify` on one node's log, pinned to the cluster's audit key."""
    out = subprocess.run(
        [sys.executable, "-m", "coordinator", "audit", "verify", "--db", c.audit_db(node_id),
         "--key", str(c.audit_public_key()), "--json",
         "--charges" if charges else "--no-charges"],
        capture_output=True, text=True, env=c.env, timeout=180)
    report = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}
    assert report, out.stderr
    assert (out.returncode == 0) == bool(report.get("ok")), out.stderr
    return report
