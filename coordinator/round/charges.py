"""Privacy charges computed away from the Raft process's GIL (the math: privacy.accounting).

Accounting a site's history with the PRV accountant takes a fraction of a second to
seconds of numpy work. Done on the leader's own interpreter it would stall Raft's tick
thread (and a stall longer than the election timeout deposes the leader), so charges
are computed in a worker process, started as soon as a site's DP parameters arrive.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from coordinator import lifeline
from privacy.accounting import CHARGE_FIELDS, can_afford_another, compute_charge

BudgetKey = tuple[int, float, float]
"""A site's (charges recorded, budget epsilon, budget delta)."""


def recheck(keys: Mapping[str, BudgetKey], known: Mapping[str, tuple[BudgetKey, bool]]
            ) -> list[str]:
    """The sites whose affordability must be computed: charged at least once, and not
    known at their current key. Every round otherwise re-reads only this cheap key."""
    return [s for s, key in keys.items() if key[0] and (s not in known or known[s][0] != key)]


class ChargePool:
    """A worker process that computes charges and budget checks for the leader."""

    def __init__(self, workers: int = 1) -> None:
        self._pool = ProcessPoolExecutor(max_workers=workers,
                                         mp_context=multiprocessing.get_context("spawn"),
                                         initializer=lifeline.die_with_parent,
                                         initargs=(os.getpid(),))
        self._afford: dict[str, tuple[BudgetKey, bool]] = {}

    def submit(self, site_record: dict[str, Any], reported: dict[str, float]) -> Future | None:
        """Start the charge for a site's reported `dp_*` metrics; None when it reported none."""
        if not all(f"dp_{k}" in reported for k in CHARGE_FIELDS):
            return None
        step = {k: reported[f"dp_{k}"] for k in CHARGE_FIELDS}
        history = [{k: c[k] for k in CHARGE_FIELDS} for c in site_record["charges"]]
        return self._pool.submit(compute_charge, history, step, site_record["budget"]["delta"],
                                 site_record["spent"])

    def unaffordable(self, keys: Mapping[str, BudgetKey],
                     histories: Callable[[list[str]], Mapping[str, list[dict[str, Any]]]],
                     timeout: float = 60.0) -> set[str]:
        """The charged sites whose budget cannot pay another round like their last.

        `keys` is each charged eligible site's (charges, epsilon, delta)
        (`queries.budget_keys`): only a site whose key changed since its last check
        (charged again, or an operator's `set_budget` made an exhausted site eligible) is
        checked again, its charges' DP parameters read through `histories`. The cache
        keeps one entry per site.
        """
        stale = recheck(keys, self._afford)
        found = histories(stale) if stale else {}
        pending = {site: self._pool.submit(can_afford_another, found[site], keys[site][2],
                                           keys[site][1]) for site in stale}
        for site, fut in pending.items():
            self._afford[site] = (keys[site], bool(fut.result(timeout=timeout)))
        return {site for site in keys if not self._afford[site][1]}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
