"""A run the cluster cannot satisfy ends with its real reason; an operator can stop one.

Real processes: 3 nodes, 3 enrolled sites of which 2 run, through the `fedraft` CLI."""

from __future__ import annotations

import datetime as dt
import json
import time

from coordinator.audit.store import open_readonly

from .conftest import fedraft_cli as _fedraft


def test_unsatisfiable_runs_are_refused_or_stopped_with_the_reason(make_cluster) -> None:
    c = make_cluster(sites=["site-1", "site-2"])
    c.add_site("site-3")  # enrolled, never started
    refused = _fedraft(c, "round", "start", "--rounds", "1", "--min-clients", "4", "--json")
    assert refused.returncode == 1
    assert "min_clients is 4 but only 3 sites can take part" in refused.stderr
    deadline = time.monotonic() + 60  # the two agents poll the leader
    while ((c.status(c.wait_leader(10)) or {}).get("clients_online") or 0) < 2:
        assert time.monotonic() < deadline, "the sites did not come online"
        time.sleep(0.2)
    # 3 of 3 enrolled sites must be online; 2 are: each try waits 1 s, the 2nd ends the run
    out = _fedraft(c, "round", "start", "--rounds", "2", "--min-clients", "3", "--json",
                   "--set", "online_wait_s=1.0", "--set", "max_attempts=2",
                   "--set", "secure_aggregation=false")
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["last_round"] == 0 and summary["stopped"]["node"] == c.wait_leader(10)
    assert summary["stopped"]["reason"] == (
        "round 1 could not start 2 times in a row; the last: only 2 of the 3 sites to sample "
        "were online within 1 s (min_clients 3)")
    assert "the run stopped at round 0 of 2" in out.stderr
    # an operator's stop is recorded with the operator's name and reason
    _fedraft(c, "round", "start", "--rounds", "5", "--min-clients", "2", "--no-wait",
             "--set", "secure_aggregation=false", "--set", "collect_timeout_s=10")
    stop = _fedraft(c, "round", "stop", "--reason", "wrong data at site-2", "--json")
    assert stop.returncode == 0, stop.stderr
    assert json.loads(stop.stdout)["operator"] == "operator"
    status = json.loads(_fedraft(c, "round", "status", "--json").stdout)
    assert status["target_round"] < 5 and status["stopped"]["reason"] == "wrong data at site-2"
    deadline = time.monotonic() + 20
    while True:
        store = open_readonly(c.audit_db(c.wait_leader(10)))
        try:
            stops = [e.payload for e in store.entries() if e.kind == "training_stopped"]
        finally:
            store.close()
        if len(stops) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert stops[0]["reason"] == summary["stopped"]["reason"] and "node" in stops[0]
    assert stops[0]["actor"] == f"node:{stops[0]['node']}"
    when = stops[1].pop("time")  # the leader's wall clock, to the millisecond
    assert abs(dt.datetime.fromisoformat(when).timestamp() - time.time()) < 120
    assert stops[1] == {"target_round": status["target_round"], "operator": "operator",
                        "actor": "operator", "run": "run-2", "reason": "wrong data at site-2"}
