"""The replicated state machine: every decision the cluster agrees on, and nothing else.

`apply(state, command)` is deterministic (no clock, no randomness, no I/O) so every
replica that applies the same log reaches the same state. State is plain data (dicts,
lists, str, int, float) so that pysyncobj can snapshot it and the CLI can print it.
A rejected command returns an error result and leaves the state untouched: all checks
run before the first mutation. The operations live by concern in `ops_sites`,
`ops_runs`, `ops_rounds` and `ops_cluster`; `commands` builds the commands they take.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from coordinator import wire
from coordinator.core import commands as cmds
from coordinator.core import ops_cluster, ops_rounds, ops_runs, ops_sites
from coordinator.core.round_config import DEFAULT_ROUND_CONFIG

State = dict[str, Any]
Command = dict[str, Any]
Result = dict[str, Any]

MAX_REMEMBERED_REQUESTS = 10_000


def initial_state() -> State:
    return {
        "seq": 0,  # commands applied so far; identical on every replica
        "fence_term": 0,
        "leader": None,
        "leader_history": [],  # [{"term", "node", "seq"}]
        "sites": {},  # site -> {"public_key", "revoked", "enrolled_seq", "budget", "spent",
        #                        "charges", and "quarantined" once the leader found it hostile}
        "versions": [],  # [{"round", "hash", "parent", "size"}], index == round
        "version_index": {},  # hash -> round (queries.version_index)
        "key_index": {},  # enrolled identity key -> site (queries.key_index)
        "revoked_index": {},  # revoked site -> True (queries.revoked_index)
        "training": {"target_round": 0, "config": dict(DEFAULT_ROUND_CONFIG)},
        "runs": {},  # run id -> {"id", "task", "status", "config", "first_round", ...}
        "round": None,  # the open round, or None
        "history": {},  # round -> {"committed": {...} | None, "aborted": [...]}
        "attempts": {},  # round -> attempts opened so far
        "requests": {},  # request_id -> result, for idempotent retries
        "request_order": [],
        "members": None,  # after the first membership change: [{"id", "raft", "fleet", "admin"}]
        "audit_head": None,  # the newest signed audit head: {"tree_size", "root_hash", ...}
    }


OPS: dict[str, Callable[[State, Command], Result]] = {
    cmds.BARRIER: ops_cluster.barrier,
    cmds.CLAIM: ops_cluster.claim,
    cmds.ENROLL: ops_sites.enroll,
    cmds.SET_BUDGET: ops_sites.set_budget,
    cmds.REVOKE: ops_sites.revoke,
    cmds.GENESIS: ops_runs.genesis,
    cmds.TRAIN: ops_runs.train,
    cmds.STOP: ops_runs.stop,
    cmds.ROUND_OPEN: ops_rounds.round_open,
    cmds.ROUND_ABORT: ops_rounds.round_abort,
    cmds.ROUND_COMMIT: ops_rounds.round_commit,
    cmds.LATE_CHARGE: ops_rounds.late_charge,
    cmds.MEMBERSHIP: ops_cluster.membership,
    cmds.AUDIT_HEAD: ops_cluster.audit_head,
    cmds.QUARANTINE: ops_sites.quarantine,
    cmds.RUN_EVALUATED: ops_runs.run_evaluated,
}


def _remember(state: State, request_id: str, result: Result) -> None:
    state["requests"][request_id] = result
    state["request_order"].append(request_id)
    while len(state["request_order"]) > MAX_REMEMBERED_REQUESTS:
        state["requests"].pop(state["request_order"].pop(0), None)


def apply(state: State, command: Command) -> Result:
    """Apply one command; returns {"ok": True, ...} or {"ok": False, "code", "error"}.

    A command with a `request_id` seen before returns the first result again, marked
    `"replayed": True`, and changes nothing, so callers may retry after a timeout or a
    leader change; the mark keeps hooks (the audit log) from recording the command twice.
    A command carrying `submitted_term` older than the fence is refused unapplied: a write
    that sat queued on a cut-off leader must not land after healing, over writes the
    majority acknowledged since (its submitter timed out, so it was never acknowledged).
    """
    state["seq"] += 1
    if not isinstance(command, dict):
        return {"ok": False, "code": "malformed", "error": "command must be a map"}
    request_id = command.get("request_id")
    if request_id is not None:
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 128:
            return {"ok": False, "code": "malformed", "error": "bad request_id"}
        if request_id in state["requests"]:
            return {**copy.deepcopy(state["requests"][request_id]), "replayed": True}
    submitted = command.get("submitted_term")
    if submitted is not None:
        # Not remembered under the request id: the submitter retries it in the new term.
        if isinstance(submitted, bool) or not isinstance(submitted, int):
            return {"ok": False, "code": "malformed", "error": "submitted_term must be an integer"}
        if submitted < state["fence_term"]:
            return {"ok": False, "code": "stale_submission",
                    "error": f"submitted in term {submitted}, before the leader of term "
                             f"{state['fence_term']} claimed it"}
    name = command.get("op")
    op = OPS.get(name) if isinstance(name, str) else None  # a list is no key (TypeError)
    if op is None:
        result: Result = {"ok": False, "code": "unknown_op", "error": f"unknown op {command.get('op')!r}"}
    else:
        try:
            result = {"ok": True, **op(state, command)}
        except wire.CodedError as exc:  # Rejected, or a field the wire schema refused
            result = {"ok": False, "code": exc.code, "error": exc.message}
    if request_id is not None:
        _remember(state, request_id, result)
    return copy.deepcopy(result)
