"""Privacy charges computed away from the Raft process's GIL (the math: privacy.accounting).

Accounting a site's history with the PRV accountant takes a fraction of a second to
seconds of numpy work. Done on the leader's own interpreter it would stall Raft's tick
thread (and a stall longer than the election timeout deposes the leader), so charges
are computed in a worker process, started as soon as a site's DP parameters arrive.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from coordinator import lifeline
from privacy.accounting import CHARGE_FIELDS, can_afford_another, compute_charge


class ChargePool:
    """A worker process that computes charges and budget checks for the leader."""

    def __init__(self, workers: int = 1) -> None:
        self._pool = ProcessPoolExecutor(max_workers=workers,
                                         mp_context=multiprocessing.get_context("spawn"),
                                         initializer=lifeline.die_with_parent,
                                         initargs=(os.getpid(),))
        self._afford: dict[tuple[str, int, float, float], bool] = {}

    def submit(self, site_record: dict[str, Any], reported: dict[str, float]) -> Future | None:
        """Start the charge for a site's reported `dp_*` metrics; None when it reported none."""
        if not all(f"dp_{k}" in reported for k in CHARGE_FIELDS):
            return None
        step = {k: reported[f"dp_{k}"] for k in CHARGE_FIELDS}
        history = [{k: c[k] for k in CHARGE_FIELDS} for c in site_record["charges"]]
        return self._pool.submit(compute_charge, history, step, site_record["budget"]["delta"],
                                 site_record["spent"])

    def affordable(self, records: dict[str, dict[str, Any]], timeout: float = 60.0) -> set[str]:
        """Sites whose budget pays another round like their last.

        Cached per history and budget: an operator's budget change (``set_budget``) must
        make an exhausted site eligible again.
        """
        out, pending = set(), {}
        for site, rec in records.items():
            key = (site, len(rec["charges"]), rec["budget"]["epsilon"], rec["budget"]["delta"])
            if key in self._afford:
                if self._afford[key]:
                    out.add(site)
                continue
            history = [{k: c[k] for k in CHARGE_FIELDS} for c in rec["charges"]]
            pending[key] = self._pool.submit(can_afford_another, history,
                                             rec["budget"]["delta"], rec["budget"]["epsilon"])
        for key, fut in pending.items():
            self._afford[key] = bool(fut.result(timeout=timeout))
            if self._afford[key]:
                out.add(key[0])
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
