"""Operations on enrolled sites: enroll, set a budget, revoke (an operator's decisions),
and quarantine (the leader's, when it found a site behind an invalid secure sum)."""

from __future__ import annotations

from typing import Any

from coordinator import wire
from coordinator.core import ledger
from coordinator.core.checks import REASON_CHARS, Command, Rejected, need, operator_name
from coordinator.core.queries import key_index, revoked_index

State = dict[str, Any]
Result = dict[str, Any]


def enroll(state: State, cmd: Command) -> Result:
    operator_name(cmd)  # who asked (for the audit log): a short name, if given
    site = wire.site_id(cmd.get("site"))
    key = wire.hex64(cmd.get("public_key"), "public_key")
    if site in state["sites"]:
        raise Rejected("exists", f"site {site!r} is already enrolled (ids are never reused)")
    if key in key_index(state):
        raise Rejected("exists", "that identity key is enrolled for another site")
    budget = ledger.budget(cmd)
    key_index(state)[key] = site
    state["sites"][site] = {"public_key": key, "revoked": False, "enrolled_seq": state["seq"],
                            "budget": budget, "spent": 0.0, "charges": []}
    return {"site": site}


def _enrolled(state: State, cmd: Command) -> tuple[str, dict[str, Any]]:
    site = wire.site_id(cmd.get("site"))
    rec = state["sites"].get(site)
    if rec is None:
        raise Rejected("unknown_site", f"site {site!r} is not enrolled")
    return site, rec


def set_budget(state: State, cmd: Command) -> Result:
    """Change an enrolled site's privacy budget (an operator's decision, audited).

    Epsilon may go down only as far as the site has already spent: below that the ledger
    would hold a site over its budget. Delta may change only before the first charge,
    since every recorded `epsilon_total` is accounted at the budget's delta and would not
    be comparable with a budget at another one. Setting the current budget again is
    accepted and reported as unchanged.
    """
    site, rec = _enrolled(state, cmd)
    if rec["revoked"]:
        raise Rejected("revoked", f"site {site!r} is revoked; its budget is closed")
    if "epsilon" not in cmd:
        raise Rejected("malformed", "missing field 'epsilon'")
    operator = operator_name(cmd)
    old = dict(rec["budget"])
    new = ledger.budget({"epsilon": cmd["epsilon"], "delta": cmd.get("delta", old["delta"])})
    if new["delta"] != old["delta"] and rec["charges"]:
        raise Rejected("delta_in_use", f"site {site!r} has been charged at delta {old['delta']:g}; "
                       "its delta can no longer change")
    if new["epsilon"] < rec["spent"]:
        raise Rejected("below_spent", f"site {site!r} has already spent epsilon "
                       f"{rec['spent']:.6g}; a budget of {new['epsilon']:.6g} would be below it")
    rec["budget"] = new
    return {"site": site, "budget": new, "old_budget": old, "spent": rec["spent"],
            "changed": new != old, "operator": operator}


def revoke(state: State, cmd: Command) -> Result:
    operator_name(cmd)
    site, rec = _enrolled(state, cmd)
    if rec["revoked"]:
        raise Rejected("revoked", f"site {site!r} is already revoked")
    revoked_index(state)[site] = True
    rec["revoked"] = True
    return {"site": site}


def quarantine(state: State, cmd: Command) -> Result:
    """Take a site out of sampling: the leader found it behind an invalid secure sum.
    It stays enrolled (its ledger and audit history stand); it is sampled no more."""
    site, rec = _enrolled(state, cmd)
    reason = need(cmd, "reason", str)[:REASON_CHARS]
    rnd, attempt = need(cmd, "round", int), need(cmd, "attempt", int)
    if rec.get("quarantined"):
        raise Rejected("quarantined", f"site {site!r} is already quarantined")
    rec["quarantined"] = {"reason": reason, "round": rnd, "attempt": attempt}
    return {"site": site, "reason": reason, "round": rnd, "attempt": attempt}
