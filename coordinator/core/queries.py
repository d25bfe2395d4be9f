"""Read-only questions about the replicated state (pure): what the driver, the APIs and
the operations themselves ask of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from privacy.accounting import CHARGE_FIELDS

State = dict[str, Any]
T = TypeVar("T")


class Fresh(Generic[T]):
    """A query's result built afresh, sharing no object with the state (new containers of
    immutable values, or copies). `Replica.state.read` deep-copies what a query returns so
    no caller holds live state; a Fresh result needs no copy, and copying one that covers
    every site (100,000 of them) would hold the lock Raft's apply thread needs."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict[int, Any]) -> Fresh[T]:
        return self

HISTORY_ROUNDS = 1_000
"""Rounds whose attempts (participants, charges, metrics) the state keeps: older ones
live in the audit log only, so the state, its snapshots and a restart stay bounded by
the federation's size, not its age. A late charge for an attempt older than this is
refused (`not_aborted`)."""


def last_round(state: State) -> int:
    """The round of the newest model version; -1 before the genesis model."""
    return len(state["versions"]) - 1


def version_index(state: State) -> dict[str, int]:
    """Model hash -> the round of its version: a commit checks a new hash in constant time,
    not by scanning every version (a year of rounds). Built once for a state restored from
    before the index existed; every replica builds the same."""
    index = state.get("version_index")
    if index is None:
        index = state["version_index"] = {v["hash"]: v["round"] for v in state["versions"]}
    return index


def key_index(state: State) -> dict[str, str]:
    """Enrolled identity key -> its site, for enrolment's reuse check in constant time."""
    index = state.get("key_index")
    if index is None:
        index = state["key_index"] = {rec["public_key"]: s for s, rec in state["sites"].items()}
    return index


def revoked_index(state: State) -> dict[str, bool]:
    """Revoked site -> True: the few revoked among many enrolled, for listing them without
    a scan of every site. Built once for a state restored from before the index existed."""
    index = state.get("revoked_index")
    if index is None:
        index = state["revoked_index"] = {
            s: True for s, rec in state["sites"].items() if rec["revoked"]}
    return index


def add_version(state: State, version: dict[str, Any]) -> None:
    """Append the next version (`versions[i]` is round i's) and index it."""
    version_index(state)[version["hash"]] = version["round"]
    state["versions"].append(version)


def head(state: State) -> str | None:
    return state["versions"][-1]["hash"] if state["versions"] else None


def eligible_sites(state: State) -> list[str]:
    """Enrolled, not revoked and not quarantined (the driver also skips sites whose
    budget is spent)."""
    return sorted(_eligible(state))


def _eligible(state: State) -> Iterator[str]:
    return (s for s, rec in state["sites"].items()
            if not rec["revoked"] and not rec.get("quarantined"))


def eligible_among(state: State, sites: set[str]) -> set[str]:
    """Those of `sites` (the online ones, say) that `eligible_sites` lists: the cost is
    the few asked about, not every enrolled site."""
    known = state["sites"]
    return {s for s in sites if s in known and not known[s]["revoked"]
            and not known[s].get("quarantined")}


def eligible_count(state: State) -> int:
    """How many sites `eligible_sites` lists, without sorting them."""
    return sum(1 for _ in _eligible(state))


def budget_keys(state: State) -> Fresh[tuple[int, dict[str, tuple[int, float, float]]]]:
    """(how many sites are eligible, each eligible site's (charges, epsilon, delta) where it
    has been charged): what decides whether a budget pays another round (a site never
    charged always can), so the leader re-checks only sites whose key changed. Built
    fresh, no site's charges copied."""
    count, keys = 0, {}
    for s, rec in state["sites"].items():
        if rec["revoked"] or rec.get("quarantined"):
            continue
        count += 1
        if rec["charges"]:
            keys[s] = (len(rec["charges"]), rec["budget"]["epsilon"], rec["budget"]["delta"])
    return Fresh((count, keys))


def charge_histories(state: State, sites: list[str]) -> Fresh[dict[str, list[dict[str, Any]]]]:
    """The DP parameters of each charge of `sites` (for the few whose budget must be checked
    again), built fresh."""
    return Fresh({s: [{k: c[k] for k in CHARGE_FIELDS} for c in state["sites"][s]["charges"]]
                  for s in sites})


def site_identity(state: State, site: str) -> tuple[str, bool] | None:
    """A site's (identity key, revoked), or None if not enrolled: what a request's
    signature check needs, not the site's whole record (its charges grow every round,
    and every poll reads this under the lock Raft's apply thread needs)."""
    rec = state["sites"].get(site)
    return None if rec is None else (rec["public_key"], rec["revoked"])


def identity_keys(state: State, sites: list[str]) -> dict[str, str]:
    """The enrolled identity keys of `sites` (a round's participants)."""
    return {s: state["sites"][s]["public_key"] for s in sites}


def training_pending(state: State) -> bool:
    return bool(state["versions"]) and last_round(state) < state["training"]["target_round"]


def open_round_cancelled(state: State) -> bool:
    """The open attempt may no longer commit: its run was stopped (or another began)."""
    r = state["round"]
    if r is None:
        return False
    return (r.get("run") != state["training"].get("run")
            or r["round"] > state["training"]["target_round"])


def run_unevaluated(state: State) -> tuple[str, str] | None:
    """(run, final version) of the newest run, once it has ended with a model of its own
    that no evaluation has been recorded for; the leader then has sites evaluate it."""
    runs = state.get("runs") or {}
    if not runs or training_pending(state) or state["round"] is not None:
        return None
    record = runs[next(reversed(runs))]
    if record["status"] == "running" or record.get("evaluation") is not None:
        return None
    final = state["versions"][-1]  # the run's own only if one of its rounds committed it
    ours = final["parent"] is not None and (
        record["first_round"] <= final["round"] <= record["target_round"])
    return (record["id"], final["hash"]) if ours else None


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

KEEP_VERSIONS = 50
"""Model versions whose blobs every node keeps: the newest ones, each run's base and
final model, and the first genesis. Older blobs are deleted (`BlobService.collect`);
their hashes stay in the state, and their rounds in the audit log."""


def retained_versions(state: State) -> set[str]:
    """The versions the retention policy keeps blobs of (`KEEP_VERSIONS`)."""
    versions = state["versions"]
    keep = {v["hash"] for v in versions[-KEEP_VERSIONS:]}
    if versions:
        keep.add(versions[0]["hash"])
    for run in state.get("runs", {}).values():
        if run.get("base"):
            keep.add(run["base"])
        final = min(run.get("last_round", run.get("target_round", -1)), len(versions) - 1)
        if final >= run.get("first_round", 0):
            keep.add(versions[final]["hash"])
    return keep


def forget_old_rounds(state: State, newest: int) -> None:
    """Drop the history and attempt counts of rounds `HISTORY_ROUNDS` before `newest`."""
    oldest_kept = newest - HISTORY_ROUNDS + 1
    for table in (state["history"], state["attempts"]):
        while table:
            first = next(iter(table))  # rounds are added in order: dicts keep it
            if first >= oldest_kept:
                break
            del table[first]


def round_window(state: State, from_round: int | None, budget: int,
                 size: Callable[[Any], int]) -> dict[str, Any]:
    """The versions and history of a bounded run of rounds, for `RoundStatus`.

    From `from_round` onward (None: the newest rounds, the open one's attempts included),
    as many rounds as fit in `budget` bytes by `size` (always at least one):
    `rounds_from`..`rounds_to` say which; a caller pages on from `rounds_to + 1`.
    Selecting costs the rounds returned, not all."""
    last = last_round(state)
    versions, history = state["versions"], state["history"]
    end = last + 1 if last + 1 in history else last
    newest_first = from_round is None
    rnd = end if newest_first else max(0, from_round)  # type: ignore[arg-type]
    picked: list[int] = []
    used = 0
    while 0 <= rnd <= end:
        cost = size([versions[rnd] if rnd <= last else None, history.get(rnd)])
        if picked and used + cost > budget:
            break
        picked.append(rnd)
        used += cost
        rnd += -1 if newest_first else 1
    picked.sort()
    return {
        "versions": [versions[r] for r in picked if r <= last],
        "history": {str(r): history[r] for r in picked if r in history},
        "rounds_from": picked[0] if picked else None,
        "rounds_to": picked[-1] if picked else None,
    }
