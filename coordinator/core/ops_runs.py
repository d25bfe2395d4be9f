"""Operations of runs: the genesis models, starting a run, stopping it.

A federation trains many runs over its life. A run has an id, a task (a label: the
site code it trains), the model its first round builds on, its configuration and its
target round; it is `running` until its target round commits (`completed`) or an
operator or the leader stops it (`stopped`, with the reason). Runs follow one another
on one hash chain of model versions: round numbers grow across runs, and a run that
starts from a fresh model takes one round number for that model's genesis (a version
with no parent), so `versions[i]` stays the version of round `i`.
"""

from __future__ import annotations

import re
from typing import Any

from coordinator import wire
from coordinator.core.checks import REASON_CHARS, Command, Rejected, holders_quorum, need, operator_name
from coordinator.core.queries import (
    add_version,
    eligible_count,
    head,
    last_round,
    run_unevaluated,
    training_pending,
    version_index,
)
from coordinator.core.round_config import validate_round_config

State = dict[str, Any]
Result = dict[str, Any]

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TASK_CHARS = 200


def _run_active(state: State) -> Rejected:
    """Why a fresh model or a new run must wait: one run runs at a time."""
    return Rejected("run_active", f"run {state['training'].get('run') or '-'} is still running: "
                    "stop it (fedraft run stop) or wait for it to end")


def genesis(state: State, cmd: Command) -> Result:
    """The cluster's first model, or (`fresh`) the first model of the next run."""
    version = wire.hex64(cmd.get("version"), "version")
    size = need(cmd, "size", int)
    holders = holders_quorum(cmd)
    fresh = cmd.get("fresh", False) is True
    at = version_index(state).get(version)
    known = None if at is None else state["versions"][at]
    if known is not None and known["parent"] is None and (not fresh or known is state["versions"][-1]):
        return {"version": version, "round": known["round"]}  # a retried upload
    if known is not None:
        raise Rejected("exists", f"model {version[:12]} is already version {known['round']}")
    if state["versions"] and not fresh:
        raise Rejected("exists", "the cluster already has a genesis model; a run that starts "
                       "from a new model uploads it with `fedraft run start --model FILE`")
    if training_pending(state) or state["round"] is not None:
        raise _run_active(state)
    if size <= 0:
        raise Rejected("malformed", "size must be positive")
    rnd = last_round(state) + 1
    add_version(state, {"round": rnd, "hash": version, "parent": None, "size": size,
                        "holders": holders})
    return {"version": version, "round": rnd, "new": True}


def _run_id(state: State, cmd: Command) -> str:
    runs = state.setdefault("runs", {})
    run = cmd.get("run")
    if run is None:
        n = len(runs) + 1
        while f"run-{n}" in runs:
            n += 1
        return f"run-{n}"
    if not isinstance(run, str) or not RUN_ID.match(run):
        raise Rejected("malformed", "a run id is 1-64 letters, digits, '.', '_' or '-', "
                       "starting with a letter or digit")
    if run in runs:
        raise Rejected("exists", f"there already is a run {run!r} ({runs[run]['status']})")
    return run


def train(state: State, cmd: Command) -> Result:
    """Start a run of `rounds` rounds from the newest model version."""
    operator = operator_name(cmd)
    rounds = need(cmd, "rounds", int)
    if not 1 <= rounds <= 100_000:
        raise Rejected("malformed", "rounds must be between 1 and 100000")
    task = cmd.get("task", "")
    if not isinstance(task, str) or len(task) > TASK_CHARS:
        raise Rejected("malformed", f"task must be a label of at most {TASK_CHARS} characters")
    if not state["versions"]:
        raise Rejected("no_model", "upload a genesis model first (fedraft model init)")
    if training_pending(state):
        raise _run_active(state)
    run = _run_id(state, cmd)
    config = validate_round_config(cmd.get("config", {}), state["training"]["config"])
    eligible = eligible_count(state)
    if config["min_clients"] > eligible:  # no round of this run could ever commit
        raise Rejected("unsatisfiable", f"min_clients is {config['min_clients']} but only "
                       f"{eligible} sites can take part (enrolled, not revoked or "
                       "quarantined); enroll more sites or lower min_clients")
    base = last_round(state)
    # attempts already spent on the first round (by a stopped run) do not count
    # against this run's max_attempts
    state["training"] = {"target_round": base + rounds, "config": config, "run": run,
                         "first_round": base + 1,
                         "attempt_base": state["attempts"].get(base + 1, 0)}
    time = cmd.get("time")
    state["runs"][run] = {
        "id": run, "task": task, "operator": operator, "base": head(state),
        "fresh": state["versions"][-1]["parent"] is None, "config": config, "rounds": rounds,
        "first_round": base + 1, "target_round": base + rounds, "status": "running",
        "stopped": None, "started_at": time if isinstance(time, str) else None,
    }
    return {"target_round": base + rounds, "run": run, "first_round": base + 1}


def stop(state: State, cmd: Command) -> Result:
    """Stop the running run: no round starts after this, and the open attempt (if any)
    is aborted by the leader; its commit is refused from now on."""
    reason = cmd.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise Rejected("malformed", "reason must be a string")
    operator, node = operator_name(cmd), cmd.get("node")
    if node is not None and not isinstance(node, str):
        raise Rejected("malformed", "node must be a node id")
    run = state["training"].get("run")
    asked = cmd.get("run")
    if asked is not None and asked != run:
        known = state.get("runs", {}).get(asked) if isinstance(asked, str) else None
        raise Rejected("not_running", f"run {asked!r} is " + (
            known["status"] if known else "unknown") + (f"; the running run is {run!r}"
                                                         if training_pending(state) else ""))
    if not training_pending(state):
        raise Rejected("not_running", "no run is running")
    state["training"]["target_round"] = last_round(state)
    stopped = {"reason": (reason or "stopped")[:REASON_CHARS],
               **({"operator": operator} if operator else {}), **({"node": node} if node else {})}
    state["training"]["stopped"] = stopped
    record = state.get("runs", {}).get(run) if run else None
    if record is not None:
        record.update(status="stopped", stopped=dict(stopped), last_round=last_round(state))
    return {"target_round": last_round(state), "run": run, **stopped}


def finish_round(state: State) -> None:
    """After a commit: the run is completed once its target round is in."""
    record = state.get("runs", {}).get(state["training"].get("run"))
    if record is not None and record["status"] == "running":
        record["last_round"] = last_round(state)
        if last_round(state) >= record["target_round"]:
            record["status"] = "completed"


def run_evaluated(state: State, cmd: Command) -> Result:
    """Record the sites' evaluation of a run's final model (fenced: the leader's)."""
    term = need(cmd, "term", int)
    if term != state["fence_term"]:
        raise Rejected("stale_term", f"term {term} is not the fence {state['fence_term']}")
    pending = run_unevaluated(state)
    if pending is None or (cmd.get("run"), cmd.get("version")) != pending:
        raise Rejected("not_evaluable", "that run's final model is not awaiting evaluation")
    raw = cmd.get("site_metrics")
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise Rejected("malformed", "site_metrics must map sites to metrics")
    sites = {wire.site_id(k): wire.check_metrics(v) for k, v in sorted(raw.items())}
    evaluation = {"version": pending[1], "metrics": wire.check_metrics(cmd.get("metrics", {})),
                  "site_metrics": sites, "term": term}
    state["runs"][pending[0]]["evaluation"] = evaluation
    return {"run": pending[0], **evaluation}
