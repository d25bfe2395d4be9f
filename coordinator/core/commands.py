"""One builder per replicated command: op names are spelled here and nowhere else.

A command is a plain map (pysyncobj carries it through one replicated method) with an
`op` and its fields. Builders only assemble: values that come from a request are passed
through as they came, and the state machine (`state.apply`) checks them, so a bad value
is refused there, with its code, and changes nothing. `request_id` makes a retried
write apply once; `Replica.submit` adds one when a builder's caller gives none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Command = dict[str, Any]

BARRIER = "barrier"
CLAIM = "claim"
ENROLL = "enroll"
SET_BUDGET = "set_budget"
REVOKE = "revoke"
GENESIS = "genesis"
TRAIN = "train"
STOP = "stop"
ROUND_OPEN = "round_open"
ROUND_ABORT = "round_abort"
ROUND_COMMIT = "round_commit"
LATE_CHARGE = "late_charge"
MEMBERSHIP = "membership"
AUDIT_HEAD = "audit_head"
QUARANTINE = "quarantine"
RUN_EVALUATED = "run_evaluated"

ROUND_EVENTS = frozenset({ROUND_OPEN, ROUND_ABORT, ROUND_COMMIT, CLAIM, REVOKE, QUARANTINE})
"""Ops after which sites waiting for a task may have a new answer."""
MODEL_VERSIONS = frozenset({GENESIS, ROUND_COMMIT})
"""Ops that name a model version every node must hold."""


def _with_id(command: Command, request_id: Any) -> Command:
    if request_id is not None:
        command["request_id"] = request_id
    return command


def barrier() -> Command:
    return {"op": BARRIER}


def claim(term: int, node: str) -> Command:
    return {"op": CLAIM, "term": term, "node": node}


def enroll(site: Any, public_key: Any, *, budget: Mapping[str, Any] | None = None,
           operator: str | None = None, request_id: Any = None) -> Command:
    """`budget` holds the `epsilon` and `delta` the request gave (absent: the defaults);
    `operator` (who asked) goes to the audit log."""
    command: Command = {"op": ENROLL, "site": site, "public_key": public_key}
    if operator is not None:
        command["operator"] = operator
    command.update({k: v for k, v in (budget or {}).items() if k in ("epsilon", "delta")})
    return _with_id(command, request_id)


def set_budget(site: Any, epsilon: Any, *, delta: Any = None, operator: str | None = None,
               request_id: Any = None) -> Command:
    command: Command = {"op": SET_BUDGET, "site": site, "epsilon": epsilon, "operator": operator}
    if delta is not None:
        command["delta"] = delta
    return _with_id(command, request_id)


def revoke(site: Any, *, operator: str | None = None, request_id: Any = None) -> Command:
    command: Command = {"op": REVOKE, "site": site}
    if operator is not None:
        command["operator"] = operator
    return _with_id(command, request_id)


def genesis(version: str, size: int, holders: list[str], cluster_size: int, *,
            fresh: bool = False, request_id: Any = None) -> Command:
    """The cluster's first model, or with `fresh` the first model of the next run."""
    command: Command = {"op": GENESIS, "version": version, "size": size, "holders": holders,
                        "cluster_size": cluster_size}
    if fresh:
        command["fresh"] = True
    return _with_id(command, request_id)


def train(rounds: Any, config: Any, *, run: Any = None, task: Any = None,
          operator: str | None = None, request_id: Any = None) -> Command:
    """Start a run (`run`: its id, else the next `run-N`; `task`: a label)."""
    command: Command = {"op": TRAIN, "rounds": rounds, "config": config}
    for key, value in (("run", run), ("task", task), ("operator", operator)):
        if value is not None:
            command[key] = value
    return _with_id(command, request_id)


def stop(*, reason: str | None = None, run: Any = None, operator: str | None = None,
         node: str | None = None, request_id: Any = None) -> Command:
    """End the running run (`run`, if given, must name it): an operator's decision
    (`operator`), or the leader's (`node`) when a round keeps failing; the open attempt
    is aborted; `reason` goes to the audit log."""
    cmd: Command = {"op": STOP}
    for key, value in (("reason", reason), ("run", run), ("operator", operator), ("node", node)):
        if value is not None:
            cmd[key] = value
    return _with_id(cmd, request_id)


def round_open(term: int, rnd: int, attempt: int, base: str, participants: list[str],
               seed: str) -> Command:
    return {"op": ROUND_OPEN, "term": term, "round": rnd, "attempt": attempt, "base": base,
            "participants": participants, "seed": seed}


def round_abort(term: int, rnd: int, attempt: int, reason: str,
                charges: dict[str, dict[str, float]]) -> Command:
    return {"op": ROUND_ABORT, "term": term, "round": rnd, "attempt": attempt,
            "reason": reason, "charges": charges}


def round_commit(term: int, rnd: int, attempt: int, *, node: str, version: str, parent: str,
                 size: int, survivors: list[str], metrics: dict[str, float],
                 holders: list[str], cluster_size: int,
                 charges: dict[str, dict[str, float]],
                 site_metrics: dict[str, dict[str, float]] | None = None) -> Command:
    """`site_metrics`: what each survivor reported of the base model it received."""
    return {"op": ROUND_COMMIT, "term": term, "round": rnd, "attempt": attempt, "node": node,
            "version": version, "parent": parent, "size": size, "survivors": survivors,
            "metrics": metrics, "holders": holders, "cluster_size": cluster_size,
            "charges": charges, "site_metrics": site_metrics or {}}


def late_charge(term: int, rnd: int, attempt: int, site: str, prior_charges: int,
                charge: dict[str, float]) -> Command:
    """The request id names the charge and the history it was computed over, so a retry
    applies once and a charge computed over a stale history is a new request."""
    return {"op": LATE_CHARGE, "term": term, "round": rnd, "attempt": attempt, "site": site,
            "prior_charges": prior_charges, "charge": charge,
            "request_id": f"late-charge:{site}:{rnd}.{attempt}:{term}:{prior_charges}"}


def membership(change: str, node: str, node_id: str, members: list[dict[str, str]],
               operator: str | None, request_id: str) -> Command:
    return {"op": MEMBERSHIP, "change": change, "node": node, "node_id": node_id,
            "members": members, "operator": operator, "request_id": request_id}


def audit_head(head: Mapping[str, Any]) -> Command:
    """The leader's signed audit head (a checkpoint over its whole log), committed so that
    every node's replicated state holds a copy an edited database cannot take back."""
    return {"op": AUDIT_HEAD, "head": dict(head)}


def quarantine(site: str, reason: str, rnd: int, attempt: int) -> Command:
    """The leader found `site` behind an invalid secure sum (see `round.hostile`)."""
    return {"op": QUARANTINE, "site": site, "reason": reason, "round": rnd, "attempt": attempt,
            "request_id": f"quarantine:{site}:{rnd}.{attempt}"}


def run_evaluated(term: int, run: str, version: str, site_metrics: dict[str, dict[str, float]],
                  metrics: dict[str, float]) -> Command:
    """What the sites reported of a run's final model (`version`), after the run ended."""
    return {"op": RUN_EVALUATED, "term": term, "run": run, "version": version,
            "site_metrics": site_metrics, "metrics": metrics,
            "request_id": f"run-evaluated:{run}:{version}"}
