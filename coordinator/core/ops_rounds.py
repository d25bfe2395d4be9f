"""Operations of rounds: each attempt of a run's rounds (runs themselves: `ops_runs`).

Round commands of the driver are fenced: they carry the term of the leader that issued
them and anything older is refused, so a deposed leader commits nothing. An attempt is
opened, then either committed (one model version, the next link of the hash chain) or
aborted; both record the privacy charges of the sites whose updates were sent.
"""

from __future__ import annotations

from typing import Any

from coordinator import wire
from coordinator.core import ledger, ops_runs
from coordinator.core.checks import REASON_CHARS, Command, Rejected, holders_quorum, need
from coordinator.core.queries import (
    add_version,
    forget_old_rounds,
    head,
    last_round,
    open_round_cancelled,
    training_pending,
    version_index,
)

State = dict[str, Any]
Result = dict[str, Any]


def _fenced(state: State, cmd: Command) -> int:
    """Commands of the round driver carry the term of the leader that issued them."""
    term = need(cmd, "term", int)
    if term < state["fence_term"]:
        raise Rejected("stale_term", f"term {term} is older than the fence {state['fence_term']}")
    if term > state["fence_term"]:
        raise Rejected("unclaimed_term", f"term {term} has not claimed leadership")
    return term


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


def _participants(state: State, raw: list[Any], min_clients: int) -> list[str]:
    sites = [wire.site_id(s) for s in raw]
    if len(set(sites)) != len(sites):
        raise Rejected("malformed", "participants repeat a site")
    for s in sites:
        rec = state["sites"].get(s)
        if rec is None or rec["revoked"]:
            raise Rejected("unknown_site", f"site {s!r} is not enrolled")
    if len(sites) < min_clients:
        raise Rejected("too_few", f"{len(sites)} participants, minimum {min_clients}")
    return sorted(sites)


def round_open(state: State, cmd: Command) -> Result:
    term = _fenced(state, cmd)
    rnd = need(cmd, "round", int)
    attempt = need(cmd, "attempt", int)
    base = wire.hex64(cmd.get("base"), "base")
    participants = need(cmd, "participants", list)
    seed = need(cmd, "seed", str)
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
    sites = _participants(state, participants, config["min_clients"])
    state["attempts"][rnd] = attempt
    state["round"] = {"round": rnd, "attempt": attempt, "term": term, "base": base,
                      "participants": sites, "seed": seed, "config": dict(config),
                      "opened_seq": state["seq"], "run": state["training"].get("run")}
    state["history"].setdefault(rnd, {"committed": None, "aborted": []})
    return {"round": rnd, "attempt": attempt}


def round_abort(state: State, cmd: Command) -> Result:
    term = _fenced(state, cmd)
    r = _open_round(state, cmd)
    reason = need(cmd, "reason", str)[:REASON_CHARS]
    charges = ledger.check_charges(state, cmd, r["participants"])
    ledger.spend(state, r["round"], r["attempt"], charges)
    state["history"][r["round"]]["aborted"].append(
        {"attempt": r["attempt"], "term": term, "reason": reason,
         "participants": r["participants"], "charges": charges}
    )
    state["round"] = None
    return {"round": r["round"], "attempt": r["attempt"]}


def round_commit(state: State, cmd: Command) -> Result:
    term = _fenced(state, cmd)
    r = _open_round(state, cmd)
    version = wire.hex64(cmd.get("version"), "version")
    parent = wire.hex64(cmd.get("parent"), "parent")
    size = need(cmd, "size", int)
    survivors = [wire.site_id(s) for s in need(cmd, "survivors", list)]
    metrics = wire.check_metrics(cmd.get("metrics", {}))
    site_metrics = cmd.get("site_metrics", {})
    if not isinstance(site_metrics, dict) or not set(site_metrics) <= set(survivors):
        raise Rejected("malformed", "site_metrics must map survivors to their metrics")
    site_metrics = {s: wire.check_metrics(m) for s, m in sorted(site_metrics.items())}
    holders = holders_quorum(cmd)
    if open_round_cancelled(state):
        raise Rejected("stopped", "the run of this attempt was stopped: it may not commit")
    if parent != r["base"] or parent != head(state):
        raise Rejected("wrong_base", "parent is not the round's base version")
    if version in version_index(state):
        raise Rejected("exists", "that model version is already committed")
    if not set(survivors) <= set(r["participants"]) or len(set(survivors)) != len(survivors):
        raise Rejected("malformed", "survivors must be distinct participants")
    if len(survivors) < r["config"]["min_clients"]:
        raise Rejected("too_few", "fewer survivors than min_clients")
    if size <= 0:
        raise Rejected("malformed", "size must be positive")
    charges = ledger.check_charges(state, cmd, r["participants"])
    ledger.spend(state, r["round"], r["attempt"], charges)
    add_version(state, {"round": r["round"], "hash": version, "parent": parent, "size": size,
                        "holders": holders})
    node = cmd.get("node")
    state["history"][r["round"]]["committed"] = {
        "attempt": r["attempt"], "term": term, "leader": node if isinstance(node, str) else None,
        "version": version, "parent": parent, "participants": r["participants"],
        "survivors": sorted(survivors), "metrics": metrics, "charges": charges,
        "site_metrics": site_metrics,
    }
    state["round"] = None
    ops_runs.finish_round(state)
    forget_old_rounds(state, r["round"])
    return {"round": r["round"], "version": version}


def late_charge(state: State, cmd: Command) -> Result:
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
    rnd = need(cmd, "round", int)
    attempt = need(cmd, "attempt", int)
    seen = need(cmd, "prior_charges", int)
    site = wire.site_id(cmd.get("site"))
    rec = state["sites"].get(site)
    if rec is None:
        raise Rejected("unknown_site", f"site {site!r} is not enrolled")
    aborted = _aborted_attempt(state, rnd, attempt)
    if site not in aborted["participants"]:
        raise Rejected("not_participant", f"{site!r} was not a participant of {rnd}.{attempt}")
    if site in aborted["charges"]:
        raise Rejected("already_charged", f"{site!r} is already charged for {rnd}.{attempt}")
    if seen != len(rec["charges"]):
        raise Rejected("stale_history", f"charge computed over {seen} runs of {site!r}; "
                       f"the ledger now holds {len(rec['charges'])}")
    charge = ledger.charge_numbers(state, site, cmd.get("charge"))
    aborted["charges"][site] = charge
    ledger.spend(state, rnd, attempt, {site: charge})
    return {"round": rnd, "attempt": attempt, "term": term, "site": site, "charge": dict(charge),
            "overspent": ledger.overspent(state, site, charge["epsilon_total"])}


def _aborted_attempt(state: State, rnd: int, attempt: int) -> dict[str, Any]:
    hist = state["history"].get(rnd)
    aborted = next((a for a in hist["aborted"] if a["attempt"] == attempt), None) if hist else None
    if aborted is None:
        done = hist is not None and (hist["committed"] or {}).get("attempt") == attempt
        raise Rejected("not_aborted", f"attempt {rnd}.{attempt} is "
                       f"{'committed' if done else 'open or unknown'}; only an aborted "
                       "attempt takes late charges")
    return aborted
