"""A machine-wide cache of planned noise multipliers, shared by the sites on one host.

``noise_multiplier_for`` is a deterministic search costing 5-8 PRV evaluations (several
seconds of CPU). Sites that start together on one machine (a demo, a test cluster, a
lab running many sites) with the same plan would each repeat it; the first computes it
under a file lock and the rest read the answer. A cached answer is re-checked with one
evaluation that it fits the budget, and every round is checked against the budget
anyway, so a stale or edited cache can only cost a refusal, never an overspend.

Directory: ``FEDRAFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedraft``, else
``~/.cache/fedraft``; anything that fails there falls back to computing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from client.store import write_atomic
from privacy.accounting import DPStep, epsilon_spent, noise_multiplier_for

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    explicit = os.environ.get("FEDRAFT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedraft"


def planned_noise_multiplier(epsilon_budget: float, delta: float, sample_rate: float,
                             steps_per_round: int, planned_rounds: int,
                             history: Sequence[DPStep] = (), clip_norm: float = 1.0) -> float:
    """``noise_multiplier_for`` with the same arguments, through the shared cache."""
    args = [epsilon_budget, delta, sample_rate, steps_per_round, planned_rounds,
            [s.to_dict() for s in history], clip_norm]
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()
    folder = cache_dir() / "noise-multipliers"

    def compute() -> float:
        return noise_multiplier_for(epsilon_budget, delta, sample_rate, steps_per_round,
                                    planned_rounds, history, clip_norm)

    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / ".lock", "a+b")  # noqa: SIM115 - held across the computation
    except OSError:
        return compute()
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = folder / f"{key}.json"
        try:
            sigma = float(json.loads(path.read_text())["noise_multiplier"])
            step = DPStep(sigma, sample_rate, steps_per_round, clip_norm)
            if epsilon_spent([*history, *[step] * planned_rounds], delta) <= epsilon_budget:
                return sigma
            log.warning("cached noise multiplier %s does not fit its plan; recomputing", sigma)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        sigma = compute()
        try:
            write_atomic(path, json.dumps({"args": args, "noise_multiplier": sigma}).encode())
        except OSError:
            pass
        return sigma
