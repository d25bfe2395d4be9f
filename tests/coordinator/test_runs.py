"""Runs: many experiments over a federation's life, each with an id, task, model, config,
target and status; a stop aborts the open attempt. Pure state tests, then a real cluster
driven through the `fedraft run` CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from coordinator.audit.store import open_readonly
from coordinator.audit.writer import audit_record
from coordinator.core.queries import run_unevaluated
from coordinator.core.state import apply, initial_state
from coordinator.demo.cluster import LocalCluster

from .conftest import fedraft_cli as _fedraft

V0, V1, V2 = "0" * 64, "1" * 64, "2" * 64


def _genesis(s: dict, version: str, fresh: bool = False) -> dict:
    cmd = {"op": "genesis", "version": version, "size": 1, "holders": ["n1"], "cluster_size": 1}
    return apply(s, cmd | ({"fresh": True} if fresh else {}))


def _round(s: dict, rnd: int, attempt: int, base: str, version: str | None) -> dict:
    assert apply(s, {"op": "round_open", "term": 2, "round": rnd, "attempt": attempt, "base": base,
                     "participants": ["a", "b"], "seed": "00"})["ok"]
    if version is None:
        return {}
    return apply(s, {"op": "round_commit", "term": 2, "round": rnd, "attempt": attempt,
                     "node": "n1", "version": version, "parent": base, "size": 1,
                     "survivors": ["a", "b"], "metrics": {}, "holders": ["n1"],
                     "cluster_size": 1, "site_metrics": {"a": {"eval_accuracy": 0.5}}})


def _state() -> dict:
    s = initial_state()
    for site in ("a", "b"):
        assert apply(s, {"op": "enroll", "site": site, "public_key": site * 64})["ok"]
    assert _genesis(s, V0)["ok"] and apply(s, {"op": "claim", "term": 2, "node": "n1"})["ok"]
    return s


def test_runs_follow_one_another_with_ids_status_and_fresh_models() -> None:
    s = _state()
    started = apply(s, {"op": "train", "rounds": 1, "task": "digits", "operator": "alice"})
    assert started == {"ok": True, "target_round": 1, "run": "run-1", "first_round": 1}
    busy = apply(s, {"op": "train", "rounds": 1, "run": "other"})
    assert busy["code"] == "run_active" and "run-1 is still running" in busy["error"]
    assert _genesis(s, V2, fresh=True)["code"] == "run_active"  # no fresh model mid-run
    assert _round(s, 1, 1, V0, V1)["ok"]
    run1 = s["runs"]["run-1"]
    assert run1["status"] == "completed" and run1["task"] == "digits" and run1["base"] == V0
    # its final model awaits the sites' evaluation, recorded once, by the fenced leader
    assert run_unevaluated(s) == ("run-1", V1)
    evaluated = {"op": "run_evaluated", "term": 2, "run": "run-1", "version": V1,
                 "site_metrics": {"a": {"eval_accuracy": 0.9}}, "metrics": {"eval_accuracy": 0.9}}
    assert apply(s, evaluated | {"term": 1})["code"] == "stale_term"
    assert apply(s, evaluated | {"version": V0})["code"] == "not_evaluable"
    assert apply(s, evaluated)["ok"] and run1["evaluation"]["site_metrics"] == {
        "a": {"eval_accuracy": 0.9}}
    assert run_unevaluated(s) is None and apply(s, evaluated)["ok"] is False
    assert s["history"][1]["committed"]["site_metrics"] == {"a": {"eval_accuracy": 0.5}}
    # a second experiment from a fresh model: it takes round 2 for its genesis
    assert _genesis(s, V1, fresh=True)["code"] == "exists"  # a committed version is no genesis
    fresh = _genesis(s, V2, fresh=True)
    assert fresh == {"ok": True, "version": V2, "round": 2, "new": True}
    assert audit_record({"op": "genesis", "version": V2, "size": 1}, fresh, s) == (
        "model_genesis", {"version": V2, "size": 1, "round": 2})
    assert _genesis(s, V2, fresh=True)["version"] == V2  # a retried upload is the same
    assert apply(s, {"op": "train", "rounds": 1, "run": "run-1"})["code"] == "exists"
    assert apply(s, {"op": "train", "rounds": 1, "run": "bad id!"})["code"] == "malformed"
    second = apply(s, {"op": "train", "rounds": 3, "run": "exp-2"})
    assert run_unevaluated(s) is None  # run-1's model is no longer the newest
    assert second["first_round"] == 3 and s["runs"]["exp-2"]["fresh"] is True
    assert s["runs"]["exp-2"]["base"] == V2


def test_a_stop_aborts_the_open_attempt_and_names_the_run() -> None:
    s = _state()
    assert apply(s, {"op": "train", "rounds": 5, "run": "exp"})["ok"]
    _round(s, 1, 1, V0, None)  # open, not yet committed
    wrong = apply(s, {"op": "stop", "run": "nope"})
    assert wrong["code"] == "not_running" and "'nope' is unknown" in wrong["error"]
    stopped = apply(s, {"op": "stop", "run": "exp", "reason": "bad data", "operator": "alice"})
    assert stopped["ok"] and stopped["run"] == "exp" and stopped["target_round"] == 0
    late = apply(s, {"op": "round_commit", "term": 2, "round": 1, "attempt": 1, "node": "n1",
                     "version": V1, "parent": V0, "size": 1, "survivors": ["a", "b"],
                     "metrics": {}, "holders": ["n1"], "cluster_size": 1})
    assert late["code"] == "stopped"  # the leader aborts it instead
    assert apply(s, {"op": "round_abort", "term": 2, "round": 1, "attempt": 1,
                     "reason": "run_stopped"})["ok"]
    run = s["runs"]["exp"]
    assert run["status"] == "stopped" and run["stopped"] == {"reason": "bad data",
                                                             "operator": "alice"}
    assert apply(s, {"op": "stop"})["code"] == "not_running"
    # the next run starts at the round the stopped one never committed
    assert apply(s, {"op": "train", "rounds": 1})["first_round"] == 1


# ---------------------------------------------------------------- a real cluster



def _fresh_model(c: LocalCluster, out: Path) -> Path:
    tensors = load_file(str(c.root / "genesis.safetensors"))
    rng = np.random.default_rng(7)
    save_file({k: (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype) for k, v in tensors.items()},
              str(out))
    return out


def test_run_start_list_show_stop_through_the_cli(make_cluster, tmp_path: Path) -> None:
    c = make_cluster(sites=["site-1", "site-2"])
    first = _fedraft(c, "run", "start", "--name", "first", "--task", "breast cancer",
                     "--rounds", "2", "--set", "secure_aggregation=false", "--json")
    assert first.returncode == 0, first.stderr
    one = json.loads(first.stdout)
    assert one["status"] == "completed" and one["rounds_committed"] == 2
    assert [r["round"] for r in one["round_rows"]] == [1, 2]
    assert one["final_version"] == one["versions"][-1] == one["round_rows"][-1]["version"]
    assert sorted(one["final_site_metrics"]) == ["site-1", "site-2"]
    # the final model went back to the sites, which report how it does on their records
    final = one["final_evaluation"]
    assert final["version"] == one["final_version"] and sorted(final["site_metrics"]) == [
        "site-1", "site-2"]
    accuracies = [m["eval_accuracy"] for m in final["site_metrics"].values()]
    assert final["metrics"]["eval_accuracy"] == sum(accuracies) / 2 and min(accuracies) > 0.5
    assert all(0.0 <= m["eval_accuracy"] <= 1.0 for m in one["final_site_metrics"].values())
    again = _fedraft(c, "run", "start", "--name", "first", "--rounds", "1", "--no-wait")
    assert again.returncode == 1 and "already is a run 'first' (completed)" in again.stderr
    # a second experiment from a fresh model, stopped mid-way
    model = _fresh_model(c, tmp_path / "fresh.safetensors")
    second = _fedraft(c, "run", "start", "--name", "second", "--model", str(model),
                      "--rounds", "50", "--no-wait", "--json",
                      "--set", "secure_aggregation=false")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["first_round"] == 4  # round 3 is its genesis
    c.wait_round(4, timeout=60)
    stop = _fedraft(c, "run", "stop", "second", "--reason", "enough", "--json")
    assert stop.returncode == 0, stop.stderr
    stopped_at = json.loads(stop.stdout)["target_round"]
    time.sleep(2.0)  # an attempt open at the stop is aborted, never committed
    listed = json.loads(_fedraft(c, "run", "list", "--json").stdout)["runs"]
    assert [(r["id"], r["status"]) for r in listed] == [("first", "completed"),
                                                         ("second", "stopped")]
    shown = json.loads(_fedraft(c, "run", "show", "second", "--json").stdout)
    assert shown["stopped"] == {"reason": "enough", "operator": "operator"}
    assert shown["last_round"] == stopped_at and shown["fresh"] is True
    assert shown["base"] != one["final_version"] and shown["task"] == ""
    missing = _fedraft(c, "run", "show", "nope")
    assert missing.returncode == 1 and "no run 'nope' (runs: first, second)" in missing.stderr
    store = open_readonly(c.audit_db(c.wait_leader(10)))
    try:
        entries = store.entries()
    finally:
        store.close()
    kinds = {e.kind: e.payload for e in entries}  # the last of each kind
    assert kinds["model_genesis"]["round"] == 3 and kinds["model_genesis"]["version"] == shown["base"]
    requested = [e.payload for e in entries if e.kind == "training_requested"]
    assert [(p["run"], p["task"], p["first_round"]) for p in requested] == [
        ("first", "breast cancer", 1), ("second", "", 4)]
    assert all(p["actor"] == "operator" and p["time"].endswith("Z") for p in requested)
    assert kinds["training_stopped"]["run"] == "second"
    committed = [e.payload for e in entries if e.kind == "round_committed"]
    assert committed[0]["run"] == "first" and committed[-1]["run"] == "second"
    assert committed[0]["actor"].startswith("node:") and committed[0]["site_metrics"]
    evaluated = [e.payload for e in entries if e.kind == "run_evaluated"]
    assert evaluated[0]["run"] == "first" and evaluated[0]["site_metrics"] == final["site_metrics"]
    opened = [e.payload for e in entries if e.kind == "round_opened"]
    assert opened[0]["config"]["secure_aggregation"] is False
