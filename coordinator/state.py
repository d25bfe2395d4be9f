"""The replicated state machine: every decision the cluster agrees on, and nothing else.

`apply(state, command)` is deterministic (no clock, no randomness, no I/O) so every
replica that applies the same log reaches the same state. State is plain data (dicts,
lists, str, int, float) so that pysyncobj can snapshot it and the CLI can print it.
A rejected command returns an error result and leaves the state untouched: all checks
run before the first mutation.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from typing import Any

State = dict[str, Any]
Command = dict[str, Any]
Result = dict[str, Any]

SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
HOST_PORT = re.compile(r"^[A-Za-z0-9_.:\[\]-]{1,253}:[0-9]{1,5}$")
MAX_REMEMBERED_REQUESTS = 10_000
MAX_LEADER_HISTORY = 200
MAX_METRICS = 64
MAX_MEMBERS = 64
MEMBERSHIP_CHANGES = ("add", "remove", "transfer")
DEFAULT_EPSILON = 8.0
DEFAULT_DELTA = 1e-5

DEFAULT_ROUND_CONFIG: dict[str, Any] = {
    "clients": 0,  # sites sampled per round; 0 means use `fraction`
    "fraction": 1.0,
    "min_clients": 2,
    "local_epochs": 1,
    "lr": 0.05,
    "batch_size": 32,
    "collect_timeout_s": 60.0,
    "replicate_timeout_s": 10.0,
    "online_wait_s": 30.0,
    "stage_timeout_s": 20.0,  # each secure-aggregation key stage
    "secure_aggregation": True,
    "compression": 10.0,  # upload 1/compression of the coordinates (1.0: dense)
    "error_feedback": True,
    "clip": 0.5,  # per-coordinate clip of the sent update
    "residual_decay": 1.0,  # error feedback keeps this share of what was not sent (<= 1)
    "server_lr": 1.0,  # new global = base + server_lr * weighted mean update (1: FedAvg)
    "lr_final": 1.0,  # local lr decays linearly to lr * lr_final over the run (1: constant)
    "max_examples": 10000.0,  # example weight cap (weights are encoded in (0, 1])
    "threshold": 0,  # SecAgg+ threshold; 0 picks degree // 2 + 1
}


class Rejected(Exception):
    """A command that fails validation; becomes an error result, never a state change."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def initial_state() -> State:
    return {
        "seq": 0,  # commands applied so far; identical on every replica
        "fence_term": 0,
        "leader": None,
        "leader_history": [],  # [{"term", "node", "seq"}]
        "sites": {},  # site -> {"public_key", "revoked", "enrolled_seq"}
        "versions": [],  # [{"round", "hash", "parent", "size"}], index == round
        "training": {"target_round": 0, "config": dict(DEFAULT_ROUND_CONFIG)},
        "round": None,  # the open round, or None
        "history": {},  # round -> {"committed": {...} | None, "aborted": [...]}
        "attempts": {},  # round -> attempts opened so far
        "requests": {},  # request_id -> result, for idempotent retries
        "request_order": [],
        "members": None,  # after the first membership change: [{"id", "raft", "fleet", "admin"}]
    }


# ---------------------------------------------------------------- queries (pure)


def last_round(state: State) -> int:
    """The round of the newest model version; -1 before the genesis model."""
    return len(state["versions"]) - 1


def head(state: State) -> str | None:
    return state["versions"][-1]["hash"] if state["versions"] else None


def eligible_sites(state: State) -> list[str]:
    """Enrolled and not revoked (the driver also skips sites whose budget is spent)."""
    return sorted(s for s, rec in state["sites"].items() if not rec["revoked"])


def training_pending(state: State) -> bool:
    return bool(state["versions"]) and last_round(state) < state["training"]["target_round"]


def quorum(cluster_size: int) -> int:
    return cluster_size // 2 + 1


def charge_status(state: State, site: str, rnd: int, attempt: int) -> str:
    """What the ledger says of a site's DP run in one attempt, for the site to settle it.

    "charged": a charge is recorded; "chargeable": the attempt was aborted with the site
    among its participants but no charge (its leader died holding the update), so a
    `late_charge` may record it; "uncharged": the attempt ended, or its round committed,
    and will never charge the site (committed without it, not sampled, or no such
    attempt); "pending": still open, or unknown here.
    """
    hist = state["history"].get(rnd)
    if hist is None:
        return "pending"
    committed = hist["committed"]
    if committed is not None and committed["attempt"] == attempt:
        return "charged" if site in committed["charges"] else "uncharged"
    for aborted in hist["aborted"]:
        if aborted["attempt"] == attempt:
            if site in aborted["charges"]:
                return "charged"
            return "chargeable" if site in aborted["participants"] else "uncharged"
    return "pending" if committed is None else "uncharged"


# ---------------------------------------------------------------- validation helpers


def _need(cmd: Command, key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in cmd:
        raise Rejected("malformed", f"missing field {key!r}")
    value = cmd[key]
    if kind is int and isinstance(value, bool):
        raise Rejected("malformed", f"field {key!r} must be an integer")
    if not isinstance(value, kind):
        raise Rejected("malformed", f"field {key!r} has the wrong type")
    return value


def _site_id(value: Any) -> str:
    if not isinstance(value, str) or not SITE_ID.match(value):
        raise Rejected("malformed", f"bad site id {value!r}")
    return value


def _hash(value: Any, what: str) -> str:
    if not isinstance(value, str) or not HEX64.match(value):
        raise Rejected("malformed", f"{what} must be 64 lowercase hex characters")
    return value


def validate_metrics(value: Any) -> dict[str, float]:
    if not isinstance(value, dict) or len(value) > MAX_METRICS:
        raise Rejected("malformed", "metrics must be a small map of names to numbers")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int | float):
            raise Rejected("malformed", f"metric {k!r} must be a number")
        if not math.isfinite(v):
            raise Rejected("malformed", f"metric {k!r} is not finite")
        out[k] = float(v)
    return out


def _fenced(state: State, cmd: Command) -> int:
    """Commands of the round driver carry the term of the leader that issued them."""
    term = _need(cmd, "term", int)
    if term < state["fence_term"]:
        raise Rejected("stale_term", f"term {term} is older than the fence {state['fence_term']}")
    if term > state["fence_term"]:
        raise Rejected("unclaimed_term", f"term {term} has not claimed leadership")
    return term


def _holders_quorum(cmd: Command) -> list[str]:
    holders = _need(cmd, "holders", list)
    if not all(isinstance(h, str) for h in holders):  # node ids; sorted and hashed below
        raise Rejected("malformed", "holders must be node ids")
    size = _need(cmd, "cluster_size", int)
    if size < 1 or len(set(holders)) < quorum(size):
        raise Rejected("no_quorum", f"blob held by {len(set(holders))} of {size} nodes")
    return sorted(set(holders))


CHARGE_NUMBERS = ("noise_multiplier", "sample_rate", "steps", "clip_norm", "epsilon", "delta",
                  "epsilon_total")


def _charges(state: State, cmd: Command, participants: list[str]) -> dict[str, dict[str, float]]:
    """Validate per-site privacy charges: each names a participant and keeps it in budget.

    `epsilon` is the round's incremental cost and `epsilon_total` the site's cumulative
    spend over its whole recorded history (PRV accounting does not add up linearly);
    both are computed by the leader from the recorded DP parameters, deterministically,
    so an auditor can recompute them.
    """
    raw = cmd.get("charges", {})
    if not isinstance(raw, dict):
        raise Rejected("malformed", "charges must be a map of site to DP parameters")
    out = {}
    for site, c in raw.items():
        if site not in participants:
            raise Rejected("malformed", f"charge for {site!r}, who is not a participant")
        out[site] = _charge_numbers(state, site, c)
        budget = state["sites"][site]["budget"]["epsilon"]
        if out[site]["epsilon_total"] > budget + 1e-9:
            raise Rejected("overspend", f"{site!r} would spend {out[site]['epsilon_total']:.4g} "
                           f"of a budget of {budget:.4g}")
    return out


def _charge_numbers(state: State, site: str, c: Any) -> dict[str, float]:
    """One charge's numbers: all present, finite, >= 0, at the budget's delta, and a
    cumulative epsilon that does not go below what the site has spent."""
    if not isinstance(c, dict) or set(c) != set(CHARGE_NUMBERS):
        raise Rejected("malformed", f"charge for {site!r} needs exactly {CHARGE_NUMBERS}")
    for k, v in c.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise Rejected("malformed", f"charge {site}.{k} must be a finite number >= 0")
    rec = state["sites"][site]
    if c["delta"] != rec["budget"]["delta"]:
        raise Rejected("malformed", f"charge for {site!r} uses another delta than its budget")
    if c["epsilon_total"] < rec["spent"] - 1e-9:
        raise Rejected("malformed", f"cumulative epsilon of {site!r} would decrease")
    return {k: float(v) for k, v in c.items()}


def _spend(state: State, rnd: int, attempt: int, charges: dict[str, dict[str, float]]) -> None:
    for site, c in charges.items():
        rec = state["sites"][site]
        rec["spent"] = c["epsilon_total"]
        rec["charges"].append({"round": rnd, "attempt": attempt, **c})


def validate_round_config(value: Any, base: dict[str, Any]) -> dict[str, Any]:
    """Merge a partial round configuration onto `base`, rejecting unknown or bad keys."""
    if not isinstance(value, dict):
        raise Rejected("malformed", "config must be a map")
    out = dict(base)
    for key, v in value.items():
        if key not in DEFAULT_ROUND_CONFIG:
            raise Rejected("bad_config", f"unknown round config key {key!r}")
        default = DEFAULT_ROUND_CONFIG[key]
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise Rejected("bad_config", f"round config {key!r} must be true or false")
        elif isinstance(default, int):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise Rejected("bad_config", f"round config {key!r} must be an integer >= 0")
        elif isinstance(default, float):
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise Rejected("bad_config", f"round config {key!r} must be a number")
            v = float(v)
            if v <= 0:
                raise Rejected("bad_config", f"round config {key!r} must be > 0")
        out[key] = v
    if out["fraction"] > 1.0:
        raise Rejected("bad_config", "round config 'fraction' must be in (0, 1]")
    if out["min_clients"] < 1 or out["local_epochs"] < 1 or out["batch_size"] < 1:
        raise Rejected("bad_config", "min_clients, local_epochs and batch_size must be >= 1")
    if out["compression"] < 1.0:
        raise Rejected("bad_config", "round config 'compression' must be >= 1")
    if out["residual_decay"] > 1.0:
        raise Rejected("bad_config", "round config 'residual_decay' must be in (0, 1]")
    if out["lr_final"] > 1.0:
        raise Rejected("bad_config", "round config 'lr_final' must be in (0, 1]")
    if out["secure_aggregation"] and out["min_clients"] < 2:
        raise Rejected("bad_config", "secure aggregation needs min_clients >= 2")
    if out["clients"] and out["clients"] < out["min_clients"]:
        raise Rejected("bad_config", "clients per round is below min_clients")
    return out


# ---------------------------------------------------------------- operations


def _op_barrier(state: State, cmd: Command) -> Result:
    return {}


def _op_claim(state: State, cmd: Command) -> Result:
    term = _need(cmd, "term", int)
    node = _need(cmd, "node", str)
    if term < state["fence_term"]:
        raise Rejected("stale_term", f"claim for term {term} after fence {state['fence_term']}")
    if term == state["fence_term"]:
        if state["leader"] != node:
            raise Rejected("term_taken", f"term {term} already claimed by {state['leader']}")
        return {"claimed": term}
    state["fence_term"] = term
    state["leader"] = node
    state["leader_history"].append({"term": term, "node": node, "seq": state["seq"]})
    del state["leader_history"][:-MAX_LEADER_HISTORY]
    return {"claimed": term, "new": True}


def _op_enroll(state: State, cmd: Command) -> Result:
    site = _site_id(cmd.get("site"))
    key = _hash(cmd.get("public_key"), "public_key")
    if site in state["sites"]:
        raise Rejected("exists", f"site {site!r} is already enrolled (ids are never reused)")
    if any(rec["public_key"] == key for rec in state["sites"].values()):
        raise Rejected("exists", "that identity key is enrolled for another site")
    budget = _budget(cmd)
    state["sites"][site] = {"public_key": key, "revoked": False, "enrolled_seq": state["seq"],
                            "budget": budget, "spent": 0.0, "charges": []}
    return {"site": site}


def _budget(cmd: Command) -> dict[str, float]:
    """A site's (epsilon, delta) privacy budget, set at enrollment or by `set_budget`."""
    eps = cmd.get("epsilon", DEFAULT_EPSILON)
    delta = cmd.get("delta", DEFAULT_DELTA)
    for name, v in (("epsilon", eps), ("delta", delta)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise Rejected("malformed", f"{name} must be a finite number")
    if not 0 < eps <= 1000:
        raise Rejected("malformed", "epsilon must be in (0, 1000]")
    if not 0 < delta < 1:
        raise Rejected("malformed", "delta must be in (0, 1)")
    return {"epsilon": float(eps), "delta": float(delta)}


def _op_set_budget(state: State, cmd: Command) -> Result:
    """Change an enrolled site's privacy budget (an operator's decision, audited).

    Epsilon may go down only as far as the site has already spent: below that the ledger
    would hold a site over its budget. Delta may change only before the first charge,
    since every recorded `epsilon_total` is accounted at the budget's delta and would not
    be comparable with a budget at another one. Setting the current budget again is
    accepted and reported as unchanged.
    """
    site = _site_id(cmd.get("site"))
    rec = state["sites"].get(site)
    if rec is None:
        raise Rejected("unknown_site", f"site {site!r} is not enrolled")
    if rec["revoked"]:
        raise Rejected("revoked", f"site {site!r} is revoked; its budget is closed")
    if "epsilon" not in cmd:
        raise Rejected("malformed", "missing field 'epsilon'")
    operator = cmd.get("operator")
    if operator is not None and not (isinstance(operator, str) and len(operator) <= 128):
        raise Rejected("malformed", "operator must be a name of at most 128 characters")
    old = dict(rec["budget"])
    new = _budget({"epsilon": cmd["epsilon"], "delta": cmd.get("delta", old["delta"])})
    if new["delta"] != old["delta"] and rec["charges"]:
        raise Rejected("delta_in_use", f"site {site!r} has been charged at delta {old['delta']:g}; "
                       "its delta can no longer change")
    if new["epsilon"] < rec["spent"]:
        raise Rejected("below_spent", f"site {site!r} has already spent epsilon "
                       f"{rec['spent']:.6g}; a budget of {new['epsilon']:.6g} would be below it")
    rec["budget"] = new
    return {"site": site, "budget": new, "old_budget": old, "spent": rec["spent"],
            "changed": new != old, "operator": operator}


def _op_revoke(state: State, cmd: Command) -> Result:
    site = _site_id(cmd.get("site"))
    rec = state["sites"].get(site)
    if rec is None:
        raise Rejected("unknown_site", f"site {site!r} is not enrolled")
    if rec["revoked"]:
        raise Rejected("revoked", f"site {site!r} is already revoked")
    rec["revoked"] = True
    return {"site": site}


def _op_genesis(state: State, cmd: Command) -> Result:
    version = _hash(cmd.get("version"), "version")
    size = _need(cmd, "size", int)
    holders = _holders_quorum(cmd)
    if state["versions"]:
        if state["versions"][0]["hash"] == version:
            return {"version": version}
        raise Rejected("exists", "the cluster already has a genesis model")
    if size <= 0:
        raise Rejected("malformed", "size must be positive")
    state["versions"].append(
        {"round": 0, "hash": version, "parent": None, "size": size, "holders": holders}
    )
    return {"version": version}


def _op_train(state: State, cmd: Command) -> Result:
    rounds = _need(cmd, "rounds", int)
    if not 1 <= rounds <= 100_000:
        raise Rejected("malformed", "rounds must be between 1 and 100000")
    if not state["versions"]:
        raise Rejected("no_model", "upload a genesis model first (fedraft model init)")
    config = validate_round_config(cmd.get("config", {}), state["training"]["config"])
    base = max(state["training"]["target_round"], last_round(state))
    if state["round"] is not None:
        base = max(base, state["round"]["round"])
    state["training"] = {"target_round": base + rounds, "config": config,
                         "first_round": base + 1}
    return {"target_round": base + rounds}


def _op_stop(state: State, cmd: Command) -> Result:
    current = state["round"]["round"] if state["round"] else last_round(state)
    state["training"]["target_round"] = max(last_round(state), current)
    return {"target_round": state["training"]["target_round"]}


def _open_round(state: State, cmd: Command) -> dict[str, Any]:
    r = state["round"]
    if r is None:
        raise Rejected("no_open_round", "no round is open")
    if cmd.get("round") != r["round"] or cmd.get("attempt") != r["attempt"]:
        raise Rejected(
            "wrong_round",
            f"open round is {r['round']}.{r['attempt']}, "
            f"command names {cmd.get('round')}.{cmd.get('attempt')}",
        )
    return r


def _op_round_open(state: State, cmd: Command) -> Result:
    term = _fenced(state, cmd)
    rnd = _need(cmd, "round", int)
    attempt = _need(cmd, "attempt", int)
    base = _hash(cmd.get("base"), "base")
    participants = _need(cmd, "participants", list)
    seed = _need(cmd, "seed", str)
    if state["round"] is not None:
        r = state["round"]
        raise Rejected("round_in_progress", f"round {r['round']}.{r['attempt']} is still open")
    if not training_pending(state):
        raise Rejected("no_training", "no training rounds are requested")
    if rnd != last_round(state) + 1:
        raise Rejected("wrong_round", f"next round is {last_round(state) + 1}, not {rnd}")
    expected_attempt = state["attempts"].get(rnd, 0) + 1
    if attempt != expected_attempt:
        raise Rejected("wrong_attempt", f"next attempt is {expected_attempt}, not {attempt}")
    if base != head(state):
        raise Rejected("wrong_base", "base is not the newest model version")
    config = state["training"]["config"]
    sites = [_site_id(s) for s in participants]
    if len(set(sites)) != len(sites):
        raise Rejected("malformed", "participants repeat a site")
    for s in sites:
        rec = state["sites"].get(s)
        if rec is None or rec["revoked"]:
            raise Rejected("unknown_site", f"site {s!r} is not enrolled")
    if len(sites) < config["min_clients"]:
        raise Rejected("too_few", f"{len(sites)} participants, minimum {config['min_clients']}")
    state["attempts"][rnd] = attempt
    state["round"] = {
        "round": rnd,
        "attempt": attempt,
        "term": term,
        "base": base,
        "participants": sorted(sites),
        "seed": seed,
        "config": dict(config),
        "opened_seq": state["seq"],
    }
    state["history"].setdefault(rnd, {"committed": None, "aborted": []})
    return {"round": rnd, "attempt": attempt}


def _op_round_abort(state: State, cmd: Command) -> Result:
    term = _fenced(state, cmd)
    r = _open_round(state, cmd)
    reason = _need(cmd, "reason", str)[:200]
    charges = _charges(state, cmd, r["participants"])
    _spend(state, r["round"], r["attempt"], charges)
    state["history"][r["round"]]["aborted"].append(
        {"attempt": r["attempt"], "term": term, "reason": reason,
         "participants": r["participants"], "charges": charges}
    )
    state["round"] = None
    return {"round": r["round"], "attempt": r["attempt"]}


def _op_round_commit(state: State, cmd: Command) -> Result:
    term = _fenced(state, cmd)
    r = _open_round(state, cmd)
    version = _hash(cmd.get("version"), "version")
    parent = _hash(cmd.get("parent"), "parent")
    size = _need(cmd, "size", int)
    survivors = [_site_id(s) for s in _need(cmd, "survivors", list)]
    metrics = validate_metrics(cmd.get("metrics", {}))
    holders = _holders_quorum(cmd)
    if parent != r["base"] or parent != head(state):
        raise Rejected("wrong_base", "parent is not the round's base version")
    if any(v["hash"] == version for v in state["versions"]):
        raise Rejected("exists", "that model version is already committed")
    if not set(survivors) <= set(r["participants"]) or len(set(survivors)) != len(survivors):
        raise Rejected("malformed", "survivors must be distinct participants")
    if len(survivors) < r["config"]["min_clients"]:
        raise Rejected("too_few", "fewer survivors than min_clients")
    if size <= 0:
        raise Rejected("malformed", "size must be positive")
    charges = _charges(state, cmd, r["participants"])
    _spend(state, r["round"], r["attempt"], charges)
    state["versions"].append(
        {"round": r["round"], "hash": version, "parent": parent, "size": size, "holders": holders}
    )
    state["history"][r["round"]]["committed"] = {
        "attempt": r["attempt"],
        "term": term,
        "leader": cmd.get("node") if isinstance(cmd.get("node"), str) else None,
        "version": version,
        "parent": parent,
        "participants": r["participants"],
        "survivors": sorted(survivors),
        "metrics": metrics,
        "charges": charges,
    }
    state["round"] = None
    return {"round": r["round"], "version": version}


def _op_late_charge(state: State, cmd: Command) -> Result:
    """Charge a site for its DP run in an attempt aborted without that charge.

    The leader that held the site's update died, so the abort recorded nothing, but the
    site's own accountant did charge the run; the site reports it and the current leader
    charges it here, so that the ledger matches the site. The leader computed the charge
    over the site's recorded history, so it is valid only as the next entry of that
    history: `prior_charges` (the count of charges it saw) must still be the site's count.

    A total over the budget is recorded all the same and reported as `overspent`: the
    privacy is already spent, and refusing the charge would leave the ledger (and the
    audit log) understating it. The site cannot overspend again: the driver samples no
    site that cannot afford a round, and `round_commit` refuses overspending charges.
    """
    term = _fenced(state, cmd)
    rnd = _need(cmd, "round", int)
    attempt = _need(cmd, "attempt", int)
    seen = _need(cmd, "prior_charges", int)
    site = _site_id(cmd.get("site"))
    rec = state["sites"].get(site)
    if rec is None:
        raise Rejected("unknown_site", f"site {site!r} is not enrolled")
    hist = state["history"].get(rnd)
    aborted = next((a for a in hist["aborted"] if a["attempt"] == attempt), None) if hist else None
    if aborted is None:
        done = hist is not None and (hist["committed"] or {}).get("attempt") == attempt
        raise Rejected("not_aborted", f"attempt {rnd}.{attempt} is "
                       f"{'committed' if done else 'open or unknown'}; only an aborted "
                       "attempt takes late charges")
    if site not in aborted["participants"]:
        raise Rejected("not_participant", f"{site!r} was not a participant of {rnd}.{attempt}")
    if site in aborted["charges"]:
        raise Rejected("already_charged", f"{site!r} is already charged for {rnd}.{attempt}")
    if seen != len(rec["charges"]):
        raise Rejected("stale_history", f"charge computed over {seen} runs of {site!r}; "
                       f"the ledger now holds {len(rec['charges'])}")
    charge = _charge_numbers(state, site, cmd.get("charge"))
    aborted["charges"][site] = charge
    _spend(state, rnd, attempt, {site: charge})
    return {"round": rnd, "attempt": attempt, "term": term, "site": site, "charge": dict(charge),
            "overspent": charge["epsilon_total"] > rec["budget"]["epsilon"] + 1e-9}


def _host_port(value: Any, what: str) -> str:
    if not isinstance(value, str) or not HOST_PORT.match(value) or not 0 < int(
            value.rpartition(":")[2]) < 65536:
        raise Rejected("malformed", f"{what} must be host:port, got {value!r}")
    return value


def _member(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict) or set(raw) != {"id", "raft", "fleet", "admin"}:
        raise Rejected("malformed", "each member needs exactly id, raft, fleet and admin")
    node_id = raw["id"]
    if not isinstance(node_id, str) or not 0 < len(node_id) <= 64:
        raise Rejected("malformed", f"bad node id {node_id!r}")
    return {"id": node_id, **{k: _host_port(raw[k], f"member {node_id} {k}")
                              for k in ("raft", "fleet", "admin")}}


def _op_membership(state: State, cmd: Command) -> Result:
    """Record a Raft membership change the leader has already made (pysyncobj's own
    entry is not one of our commands): the member list after it, for the audit log and
    so that every node, a newly added one included, knows every member's endpoints.

    The list is what the leader observed, not derived from the previous record: a
    leader that died between the change and this record leaves a gap the next record
    closes. A request id is required, so a retried record is applied once.
    """
    if not isinstance(cmd.get("request_id"), str):
        raise Rejected("malformed", "a membership record needs a request_id")
    change = cmd.get("change")
    if change not in MEMBERSHIP_CHANGES:
        raise Rejected("malformed", f"change must be one of {', '.join(MEMBERSHIP_CHANGES)}")
    node = _host_port(cmd.get("node"), "node")
    raw = _need(cmd, "members", list)
    if not 0 < len(raw) <= MAX_MEMBERS:
        raise Rejected("malformed", f"members must list 1 to {MAX_MEMBERS} nodes")
    members = sorted((_member(m) for m in raw), key=lambda m: m["raft"])
    rafts = [m["raft"] for m in members]
    if len(set(rafts)) != len(rafts) or len({m["id"] for m in members}) != len(members):
        raise Rejected("malformed", "members repeat a node id or Raft address")
    if (node in rafts) == (change == "remove"):
        raise Rejected("malformed", f"after {change} of {node}, it must "
                       f"{'not ' if change == 'remove' else ''}be a member")
    node_id = cmd.get("node_id", node)
    if change != "remove":
        node_id = next(m["id"] for m in members if m["raft"] == node)
    elif not isinstance(node_id, str) or not 0 < len(node_id) <= 64:
        raise Rejected("malformed", f"bad node id {node_id!r}")
    operator = cmd.get("operator")
    if operator is not None and not (isinstance(operator, str) and len(operator) <= 128):
        raise Rejected("malformed", "operator must be a name of at most 128 characters")
    state["members"] = members
    return {"change": change, "node": node, "node_id": node_id, "members": rafts,
            "operator": operator}


OPS: dict[str, Callable[[State, Command], Result]] = {
    "barrier": _op_barrier,
    "claim": _op_claim,
    "enroll": _op_enroll,
    "set_budget": _op_set_budget,
    "revoke": _op_revoke,
    "genesis": _op_genesis,
    "train": _op_train,
    "stop": _op_stop,
    "round_open": _op_round_open,
    "round_abort": _op_round_abort,
    "round_commit": _op_round_commit,
    "late_charge": _op_late_charge,
    "membership": _op_membership,
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
        except Rejected as exc:
            result = {"ok": False, "code": exc.code, "error": exc.message}
    if request_id is not None:
        _remember(state, request_id, result)
    return copy.deepcopy(result)
