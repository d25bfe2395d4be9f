"""Privacy charges computed away from the Raft process's GIL.

Accounting a site's history with the PRV accountant takes a fraction of a second to
seconds of numpy work. Done on the leader's own interpreter it would stall Raft's tick
thread (and a stall longer than the election timeout deposes the leader), so charges
are computed in a worker process, started as soon as a site's DP parameters arrive.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

CHARGE_FIELDS = ("noise_multiplier", "sample_rate", "steps", "clip_norm")


def compute_charge(history: list[dict[str, float]], step: dict[str, float], delta: float,
                   spent: float) -> dict[str, float]:
    """The ledger entry for one more run: its increase and the new cumulative epsilon."""
    from privacy import accounting

    def as_step(c: dict[str, float]) -> accounting.DPStep:
        return accounting.DPStep(float(c["noise_multiplier"]), float(c["sample_rate"]),
                                 int(c["steps"]), float(c["clip_norm"]))

    run = as_step(step)
    total = accounting.epsilon_spent([*map(as_step, history), run], delta)
    return {"noise_multiplier": run.noise_multiplier, "sample_rate": run.sample_rate,
            "steps": float(run.steps), "clip_norm": run.clip_norm, "delta": delta,
            "epsilon": max(0.0, total - spent), "epsilon_total": total}


def can_afford_another(history: list[dict[str, float]], delta: float, budget: float) -> bool:
    """Whether one more run like the site's last keeps its cumulative epsilon in budget."""
    if not history:
        return True
    last = history[-1]
    return compute_charge(history, last, delta, 0.0)["epsilon_total"] <= budget + 1e-9


class ChargeCalculator:
    def __init__(self, workers: int = 1) -> None:
        self._pool = ProcessPoolExecutor(max_workers=workers,
                                         mp_context=multiprocessing.get_context("spawn"))
        self._afford: dict[tuple[str, int], bool] = {}

    def submit(self, site_record: dict[str, Any], reported: dict[str, float]) -> Future | None:
        """Start the charge for a site's reported `dp_*` metrics; None when it reported none."""
        if not all(f"dp_{k}" in reported for k in CHARGE_FIELDS):
            return None
        step = {k: reported[f"dp_{k}"] for k in CHARGE_FIELDS}
        history = [{k: c[k] for k in CHARGE_FIELDS} for c in site_record["charges"]]
        return self._pool.submit(compute_charge, history, step, site_record["budget"]["delta"],
                                 site_record["spent"])

    def affordable(self, records: dict[str, dict[str, Any]], timeout: float = 60.0) -> set[str]:
        """Sites whose budget pays another round like their last (cached per history)."""
        out, pending = set(), {}
        for site, rec in records.items():
            key = (site, len(rec["charges"]))
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
