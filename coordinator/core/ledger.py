"""The replicated privacy ledger: each site's budget and the charges recorded against it.

`epsilon` of a charge is the round's incremental cost and `epsilon_total` the site's
cumulative spend over its whole recorded history (PRV accounting does not add up
linearly); both are computed by the leader from the recorded DP parameters,
deterministically (`privacy.accounting`), so an auditor can recompute them. Here they
are only checked: present, finite, at the budget's delta, never decreasing, in budget.
"""

from __future__ import annotations

import math
from typing import Any

from coordinator import wire
from coordinator.core.checks import Command, Rejected
from privacy.accounting import BUDGET_SLACK, within_budget

State = dict[str, Any]

DEFAULT_EPSILON = 8.0
DEFAULT_DELTA = 1e-5
CHARGE_NUMBERS = ("noise_multiplier", "sample_rate", "steps", "clip_norm", "epsilon", "delta",
                  "epsilon_total")


def budget(cmd: Command) -> dict[str, float]:
    """A site's (epsilon, delta) privacy budget, set at enrollment or by `set_budget`."""
    eps = cmd.get("epsilon", DEFAULT_EPSILON)
    delta = cmd.get("delta", DEFAULT_DELTA)
    for name, v in (("epsilon", eps), ("delta", delta)):
        if not wire.is_number(v):
            raise Rejected("malformed", f"{name} must be a finite number")
    if not 0 < eps <= 1000:
        raise Rejected("malformed", "epsilon must be in (0, 1000]")
    if not 0 < delta < 1:
        raise Rejected("malformed", "delta must be in (0, 1)")
    return {"epsilon": float(eps), "delta": float(delta)}


def check_charges(state: State, cmd: Command, participants: list[str]) -> dict[str, dict[str, float]]:
    """Validate a command's per-site charges: each names a participant and keeps it in budget."""
    raw = cmd.get("charges", {})
    if not isinstance(raw, dict):
        raise Rejected("malformed", "charges must be a map of site to DP parameters")
    out = {}
    for site, c in raw.items():
        if site not in participants:
            raise Rejected("malformed", f"charge for {site!r}, who is not a participant")
        out[site] = charge_numbers(state, site, c)
        cap = state["sites"][site]["budget"]["epsilon"]
        if not within_budget(out[site]["epsilon_total"], cap):
            raise Rejected("overspend", f"{site!r} would spend {out[site]['epsilon_total']:.4g} "
                           f"of a budget of {cap:.4g}")
    return out


def charge_numbers(state: State, site: str, c: Any) -> dict[str, float]:
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
    if c["epsilon_total"] < rec["spent"] - BUDGET_SLACK:
        raise Rejected("malformed", f"cumulative epsilon of {site!r} would decrease")
    return {k: float(v) for k, v in c.items()}


def spend(state: State, rnd: int, attempt: int, charges: dict[str, dict[str, float]]) -> None:
    """Record checked charges: each site's history grows and its spend is the new total."""
    for site, c in charges.items():
        rec = state["sites"][site]
        rec["spent"] = c["epsilon_total"]
        rec["charges"].append({"round": rnd, "attempt": attempt, **c})


def overspent(state: State, site: str, total: float) -> bool:
    return not within_budget(total, state["sites"][site]["budget"]["epsilon"])
