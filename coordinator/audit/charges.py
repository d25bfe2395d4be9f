"""Recompute every recorded privacy charge from the log's own history (pure but for the
accountant the caller passes in).

Why a walk and not a per-charge check: under the PRV accountant a site's epsilon is a
function of its whole history of DP-SGD runs, not a sum of per-round costs. Each charge in
a ``round_committed``, charged ``round_aborted`` or ``charge_recorded`` entry (a late charge
on an attempt whose leader died) records the run's parameters, the site's cumulative
``epsilon_total`` after it and the round's ``epsilon`` (the increase). A late charge joins
the site's history where the log records it, as it joined the leader's ledger.
``ChargeChecker`` follows the log in order, keeps each site's history of ``DPStep``s and
recomputes both numbers exactly as the leader did (``privacy.accounting``: same conversion,
same accountant, same increase), so an honest log matches bit for bit. Along the way it
checks each charge against the site's budget from ``client_enrolled`` / ``budget_changed``.
A charge without ``epsilon_total`` (the entry format does not require it) is checked on its
``epsilon`` alone. An entry already reported as damaged is not judged, and the sites it
names are not judged after it either: their history is no longer known.

Cost: one accountant call per distinct history. Results are cached by history prefix (a
trie of runs shared by all sites), so sites with identical histories, as in a federation
that plans every site alike, cost one evaluation per round between them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.audit.entry import BUDGET_CHANGED, CLIENT_ENROLLED, Entry
from privacy.accounting import (
    BUDGET_SLACK,
    CHARGE_FIELDS,
    DPStep,
    charge_increase,
    dp_step,
    within_budget,
)

Accountant = Callable[[Sequence[DPStep], float], float]
"""Epsilon of a site's whole history of runs at ``delta``."""
Report = Callable[[str, int], None]
"""Receives (reason, seq) for each failed check."""


def prv_epsilon(history: Sequence[DPStep], delta: float) -> float:
    """The leader's accountant (``privacy.accounting.epsilon_spent``, Opacus PRV).

    Imported on first use: opacus pulls in torch, seconds that a log without charges, or a
    verification with charges skipped, should not pay.
    """
    from privacy.accounting import epsilon_spent

    return epsilon_spent(history, delta)


@dataclass(slots=True)
class _Site:
    """What the walk knows about one site so far."""

    node: int = 0  # trie node of its history; 0 is the empty history
    history: list[DPStep] = field(default_factory=list)
    total: float | None = 0.0  # recomputed cumulative epsilon; None when the accountant failed
    lost: bool = False  # a charge unreadable or in a damaged entry: history incomplete
    budget: float | None = None
    delta: float | None = None


class ChargeChecker:
    """Walks charges in log order and reports each one that does not recompute."""

    def __init__(self, accountant: Accountant, rel_tol: float = 1e-9,
                 abs_tol: float = 1e-12) -> None:
        self.accountant = accountant
        self.rel_tol = rel_tol
        self.abs_tol = abs_tol
        self.checked = 0
        self.evaluations = 0
        self.last_error = ""
        self._sites: dict[str, _Site] = {}
        self._trie: dict[tuple[int, DPStep], int] = {}
        self._totals: dict[tuple[int, float], float] = {}

    def observe(self, entry: Entry, report: Report | None) -> None:
        """Take in one entry, in log order.

        ``report`` is None for an entry already reported as damaged. Its numbers may be the
        edit, so the sites it names are no longer judged (their history or budget is
        unknown from here on) rather than flagged again at every later charge.
        """
        payload = entry.payload
        if entry.kind in (CLIENT_ENROLLED, BUDGET_CHANGED):
            self._budget(entry, report)
            return
        charges = payload.get("charges")
        if charges is None:
            return
        if not isinstance(charges, dict):
            if report:
                report("charges is not an object", entry.seq)
            return
        for site in sorted(charges):
            if report is None:
                self._sites.setdefault(str(site), _Site()).lost = True
            else:
                self._charge(entry.seq, str(site), charges[site], report)

    def _budget(self, entry: Entry, report: Report | None) -> None:
        p = entry.payload
        site, eps, delta = p.get("site"), p.get("epsilon"), p.get("delta")
        if not isinstance(site, str) or not _number(eps) or not _number(delta):
            return
        rec = self._sites.setdefault(site, _Site())
        if report is None:
            rec.budget = rec.delta = None  # unknown until the next intact budget entry
            return
        if (entry.kind == BUDGET_CHANGED and not rec.lost and rec.total is not None
                and eps < rec.total - BUDGET_SLACK):
            report(f"site {site}: budget set to {eps!r}, below the {rec.total!r} it has "
                   "already spent", entry.seq)
        rec.budget, rec.delta = float(eps), float(delta)

    def _charge(self, seq: int, site: str, params: Any, report: Report) -> None:
        rec = self._sites.setdefault(site, _Site())
        if rec.lost:
            return  # already reported; judging on a partial history would only repeat it
        try:
            step, delta = _parse(params)
        except ValueError as exc:
            report(f"site {site}: {exc}; its later charges cannot be recomputed", seq)
            rec.lost = True
            return
        previous = rec.total
        rec.node = self._trie.setdefault((rec.node, step), len(self._trie) + 1)
        rec.history.append(step)
        rec.total = self._total(rec, delta)
        if rec.total is None:
            report(f"site {site}: recomputing the charge failed: {self.last_error}", seq)
            return
        self.checked += 1
        self._judge(seq, site, params, delta, previous, rec, report)

    def _total(self, rec: _Site, delta: float) -> float | None:
        """The accountant's epsilon for the site's history, cached by history prefix."""
        key = (rec.node, delta)
        if key not in self._totals:
            try:
                self.evaluations += 1
                self._totals[key] = float(self.accountant(tuple(rec.history), delta))
            except Exception as exc:  # the accountant is caller code; report, don't crash
                self.last_error = f"{type(exc).__name__}: {exc}"
                return None
        return self._totals[key]

    def _judge(self, seq: int, site: str, params: Mapping[str, Any], delta: float,
               previous: float | None, rec: _Site, report: Report) -> None:
        total = rec.total
        assert total is not None
        recorded_total = params.get("epsilon_total")
        if recorded_total is not None and not self._close(recorded_total, total, total):
            report(f"site {site}: recorded epsilon_total {recorded_total!r}, recomputed "
                   f"{total!r} from its {len(rec.history)} recorded runs", seq)
        if previous is not None:
            increase = charge_increase(total, previous)
            if not self._close(params["epsilon"], increase, total):
                report(f"site {site}: recorded epsilon {params['epsilon']!r}, recomputed "
                       f"increase {increase!r} (cumulative {previous!r} -> {total!r})", seq)
        if rec.delta is not None and delta != rec.delta:
            report(f"site {site}: charged at delta {delta!r}, its budget's delta is "
                   f"{rec.delta!r}", seq)
        if rec.budget is not None and not within_budget(total, rec.budget):
            report(f"site {site}: cumulative epsilon {total!r} exceeds its budget "
                   f"{rec.budget!r}", seq)

    def _close(self, recorded: Any, expected: float, scale: float) -> bool:
        """Within ``rel_tol`` of the site's cumulative epsilon: an increase is a difference
        of totals, so its error is the totals' error, not a fraction of itself."""
        if not _number(recorded):
            return False
        tolerance = self.rel_tol * max(abs(scale), abs(expected)) + self.abs_tol
        return abs(recorded - expected) <= tolerance


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _parse(params: Any) -> tuple[DPStep, float]:
    """A charge's run and delta, refusing what the leader's conversion would silently bend
    (a fractional step count would be truncated, a boolean read as 1)."""
    if not isinstance(params, Mapping):
        raise ValueError("charge is not an object")
    for name in (*CHARGE_FIELDS, "delta", "epsilon"):
        if not _number(params.get(name)):
            raise ValueError(f"charge lacks a finite number {name!r}")
    if float(params["steps"]) != int(params["steps"]):
        raise ValueError(f"steps {params['steps']!r} is not a whole number")
    delta = float(params["delta"])
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta {delta!r} is not in (0, 1)")
    try:
        return dp_step(params), delta
    except (TypeError, ValueError) as exc:
        raise ValueError(f"unusable DP parameters: {exc}") from exc
