"""Privacy charges computed away from the Raft process's GIL.

Accounting a site's history with the PRV accountant takes a fraction of a second to
seconds of numpy work. Done on the leader's own interpreter it would stall Raft's tick
thread (and a stall longer than the election timeout deposes the leader), so charges
are computed in a worker process, started as soon as a site's DP parameters arrive.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from coordinator import lifeline
from privacy.accounting import DPStep

CHARGE_FIELDS = ("noise_multiplier", "sample_rate", "steps", "clip_norm")


def dp_step(params: Mapping[str, Any]) -> DPStep:
    """A recorded charge's DP parameters as the accountant's ``DPStep``.

    Shared with the audit verifier (``coordinator.audit.charges``) so that the leader and
    an auditor feed the accountant exactly the same values.
    """
    return DPStep(float(params["noise_multiplier"]), float(params["sample_rate"]),
                  int(params["steps"]), float(params["clip_norm"]))


def charge_increase(total: float, spent: float) -> float:
    """The recorded ``epsilon`` of a charge: the rise of the site's cumulative epsilon.

    PRV totals do not add up, so the increase is a difference of totals (never negative).
    """
    return max(0.0, total - spent)


def compute_charge(history: list[dict[str, float]], step: dict[str, float], delta: float,
                   spent: float) -> dict[str, float]:
    """The ledger entry for one more run: its increase and the new cumulative epsilon."""
    from privacy import accounting

    run = dp_step(step)
    total = accounting.epsilon_spent([*map(dp_step, history), run], delta)
    return {"noise_multiplier": run.noise_multiplier, "sample_rate": run.sample_rate,
            "steps": float(run.steps), "clip_norm": run.clip_norm, "delta": delta,
            "epsilon": charge_increase(total, spent), "epsilon_total": total}


def can_afford_another(history: list[dict[str, float]], delta: float, budget: float) -> bool:
    """Whether one more run like the site's last keeps its cumulative epsilon in budget."""
    if not history:
        return True
    last = history[-1]
    return compute_charge(history, last, delta, 0.0)["epsilon_total"] <= budget + 1e-9


class ChargeCalculator:
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
