"""Record-level DP accounting: agrees with Opacus, is deterministic, and plans sigma."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant

from privacy.accounting import (
    SIGMA_MIN,
    BudgetInfeasible,
    DPStep,
    accountant_history,
    epsilon_spent,
    fits_budget,
    noise_multiplier_for,
    round_charge,
)

DELTA = 1e-5
REPO = Path(__file__).resolve().parents[2]
HISTORY = [DPStep(1.5, 0.2, 10), DPStep(1.5, 0.2, 10), DPStep(2.0, 0.25, 8, clip_norm=0.5)]


def _clear_caches() -> None:
    from privacy import accounting

    accounting._prv_epsilon.cache_clear()


def test_empty_history_costs_nothing() -> None:
    assert epsilon_spent([], DELTA) == 0.0
    assert epsilon_spent([DPStep(1.0, 0.5, 0)], DELTA) == 0.0


def test_equals_opacus_accountant_driven_step_by_step() -> None:
    opacus = PRVAccountant()
    for step in HISTORY:
        for _ in range(step.steps):
            opacus.step(noise_multiplier=step.noise_multiplier, sample_rate=step.sample_rate)
    assert accountant_history(HISTORY) == tuple(opacus.history)
    assert epsilon_spent(HISTORY, DELTA) == opacus.get_epsilon(DELTA)


def test_charges_telescope_and_are_positive() -> None:
    charges = [round_charge(HISTORY[:i], HISTORY[i], DELTA) for i in range(len(HISTORY))]
    assert all(c > 0 for c in charges)
    assert sum(charges) == pytest.approx(epsilon_spent(HISTORY, DELTA), rel=1e-12)
    # Composition costs less than the sum of the runs alone.
    assert epsilon_spent(HISTORY, DELTA) < sum(epsilon_spent([s], DELTA) for s in HISTORY)


def test_fits_budget_boundary() -> None:
    total = epsilon_spent(HISTORY, DELTA)
    assert fits_budget(HISTORY[:-1], HISTORY[-1], total, DELTA)
    assert not fits_budget(HISTORY[:-1], HISTORY[-1], total * (1 - 1e-9), DELTA)


def test_repeated_calls_are_bit_stable() -> None:
    first = epsilon_spent(HISTORY, DELTA)
    _clear_caches()
    assert epsilon_spent(HISTORY, DELTA) == first
    assert epsilon_spent(list(HISTORY), DELTA) == first


def test_bit_equal_across_processes_and_without_the_rdp_memo() -> None:
    """Another process gets the same float, and plain Opacus (no memoized RDP orders,
    which the fresh process has not installed yet) gets it too."""
    code = (
        "import json, sys\n"
        "from opacus.accountants import PRVAccountant\n"
        "from privacy.accounting import DPStep, accountant_history, epsilon_spent\n"
        "h = [DPStep(**d) for d in json.loads(sys.argv[1])]\n"
        "plain = PRVAccountant(); plain.history = list(accountant_history(h))\n"
        "print(json.dumps([plain.get_epsilon(1e-5).hex(), epsilon_spent(h, 1e-5).hex()]))\n"
    )
    arg = json.dumps([s.to_dict() for s in HISTORY])
    out = subprocess.run(
        [sys.executable, "-c", code, arg], cwd=REPO, capture_output=True, text=True, check=True
    )
    plain_hex, ours_hex = json.loads(out.stdout.strip().splitlines()[-1])
    here = epsilon_spent(HISTORY, DELTA).hex()
    assert ours_hex == here
    assert plain_hex == here


def test_noise_multiplier_lands_within_budget_and_is_smallest() -> None:
    history = [DPStep(3.0, 0.2, 10)]
    q, steps, rounds, budget = 0.2, 10, 3, 2.0
    sigma = noise_multiplier_for(budget, DELTA, q, steps, rounds, history)
    assert round(sigma, 3) == sigma
    planned = [*history, *([DPStep(sigma, q, steps)] * rounds)]
    assert epsilon_spent(planned, DELTA) <= budget
    for less in (1e-3, 1e-2):
        cheaper = [*history, *([DPStep(sigma - less, q, steps)] * rounds)]
        assert epsilon_spent(cheaper, DELTA) > budget
    # More prior spend needs more noise for the same plan.
    assert sigma > noise_multiplier_for(budget, DELTA, q, steps, rounds)


def test_noise_multiplier_is_deterministic() -> None:
    a = noise_multiplier_for(3.0, DELTA, 0.25, 8, 4)
    _clear_caches()
    assert noise_multiplier_for(3.0, DELTA, 0.25, 8, 4) == a


def test_noise_multiplier_impossible_and_floor() -> None:
    spent = [DPStep(0.8, 0.5, 50)]
    with pytest.raises(BudgetInfeasible, match="already spent"):
        noise_multiplier_for(1.0, DELTA, 0.5, 10, 5, spent)
    # A budget so large that even the smallest sigma fits returns the floor.
    assert noise_multiplier_for(500.0, DELTA, 0.1, 1, 1) == SIGMA_MIN
    with pytest.raises(ValueError, match="planned_rounds"):
        noise_multiplier_for(1.0, DELTA, 0.5, 10, 0)


def test_dpstep_validation_and_wire_form() -> None:
    step = DPStep(1.25, 0.125, 16, 0.75)
    assert DPStep.from_dict(json.loads(json.dumps(step.to_dict()))) == step
    for bad in (
        {"noise_multiplier": 0.0, "sample_rate": 0.1, "steps": 1},
        {"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 1},
        {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": -1},
        {"noise_multiplier": float("nan"), "sample_rate": 0.1, "steps": 1},
    ):
        with pytest.raises(ValueError):
            DPStep(**bad)
    with pytest.raises(TypeError):
        DPStep(1.0, 0.1, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exactly the keys"):
        DPStep.from_dict({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1})
    with pytest.raises(ValueError, match="delta"):
        epsilon_spent(HISTORY, 0.0)
