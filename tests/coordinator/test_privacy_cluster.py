"""Per-site DP in a real cluster: the ledger charges every round, caps spend at the
budget, stops sampling exhausted sites, and survives a leader failover."""

import json
import os
import signal
import subprocess
import sys
import time

from privacy import accounting

BUDGET = {"epsilon": 1.0, "delta": 1e-5, "planned_rounds": 2, "clip_norm": 1.0}
SITES = ["dp-0", "dp-1", "dp-2"]


def test_ledger_charges_caps_and_survives_failover(make_cluster, tmp_path):
    c = make_cluster(sites=SITES, budget=(BUDGET["epsilon"], BUDGET["delta"]), privacy=BUDGET)
    c.admin.call("Train", {"rounds": 3, "config": {
        "fraction": 1.0, "min_clients": 2, "lr": 0.1, "local_epochs": 2,
        "compression": 2.0, "online_wait_s": 60.0, "collect_timeout_s": 60.0}})
    st = c.wait_round(2, timeout=240)
    sites = {s["site"]: s for s in c.admin.all_sites(charges=True)}
    for name in SITES:
        rec = sites[name]
        assert 0 < rec["spent"] <= BUDGET["epsilon"] + 1e-9
        # the ledger's cumulative epsilon is Opacus's accountant over the recorded runs
        steps = [accounting.DPStep(x["noise_multiplier"], x["sample_rate"], int(x["steps"]),
                                   x["clip_norm"]) for x in rec["charges"]]
        assert abs(accounting.epsilon_spent(steps, BUDGET["delta"]) - rec["spent"]) < 1e-9
        # another round like the last would exceed the budget
        assert accounting.epsilon_spent([*steps, steps[-1]], BUDGET["delta"]) > 1.0
    for r in ("1", "2"):
        assert set(st["history"][r]["committed"]["charges"]) <= set(SITES)
    # round 3 never opens: every site is exhausted, so none is sampled
    time.sleep(5)
    st3 = c.admin.round_status()
    assert st3["last_round"] == 2 and st3["open"] is None
    # the ledger survives the leader's death
    victim = c.wait_leader()
    c.kill_node(victim, signal.SIGKILL)
    c.wait_leader(timeout=20, exclude=victim)
    after = {s["site"]: s["spent"] for s in c.admin.all_sites(charges=True)}
    assert after == {k: v["spent"] for k, v in sites.items()}
    # the operator's view, with a plot
    env = {**os.environ, "FEDRAFT_ADMIN": ",".join(n.admin for n in c.nodes),
           "FEDRAFT_CA": str(c.operator.ca), "FEDRAFT_CERT": str(c.operator.cert),
           "FEDRAFT_KEY": str(c.operator.key)}
    out = subprocess.run([sys.executable, "-m", "coordinator", "privacy", "ledger", "--json",
                          "--plot", str(tmp_path / "ledger.png")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {r["site"]: r for r in json.loads(out.stdout.strip().splitlines()[-1])["sites"]}
    assert rows["dp-0"]["epsilon_spent"] == after["dp-0"]
    assert rows["dp-0"]["epsilon_remaining"] == max(0.0, 1.0 - after["dp-0"])
    assert (tmp_path / "ledger.png").stat().st_size > 1000


def test_sites_that_decline_on_their_own_budget_are_the_reason_the_run_stops(make_cluster):
    """The ledger (budget 8) would sample the sites again, but their own accountants (budget
    1, planned for one round) decline: the attempts' aborts and the run's stop say so."""
    own = {**BUDGET, "planned_rounds": 1}
    c = make_cluster(sites=SITES, budget=(8.0, BUDGET["delta"]), privacy=own)
    c.admin.call("Train", {"rounds": 3, "config": {
        "min_clients": 2, "max_attempts": 2, "stage_timeout_s": 3.0, "online_wait_s": 60.0,
        "collect_timeout_s": 60.0}})
    deadline = time.monotonic() + 180
    while not (st := c.admin.round_status())["stopped"]:
        assert time.monotonic() < deadline, st["history"]
        time.sleep(1.0)
    spent = st["last_round"]  # the rounds the sites' own budgets paid for
    assert 1 <= spent < 3
    aborted = st["history"][str(spent + 1)]["aborted"]
    assert len(aborted) == 2 and all(a["reason"].startswith("3 of 3 sites declined (dp-0: ")
                                     for a in aborted), aborted
    assert "the site declines" in aborted[0]["reason"]
    assert st["stopped"]["reason"].startswith(f"round {spent + 1} failed 2 attempts in a row")
    assert "sites declined" in st["stopped"]["reason"]
