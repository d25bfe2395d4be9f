"""Record-level DP accounting for one site's history of DP-SGD runs (Opacus PRV).

Every party computes the same numbers from the same public record: the site agent (to
refuse a round before it trains), the coordinator (to charge a site and enforce its
cap) and an auditor (to recompute every charge from the log). So this module is pure:
a site's history is a list of ``DPStep`` (noise multiplier, sample rate, number of
optimizer steps, clip norm) and epsilon is a function of that list and delta only.

Epsilon is Opacus's PRV accountant (Gopi et al. 2021), the accountant its
``PrivacyEngine`` uses by default, fed the history as ``accountant.history`` and read
with ``get_epsilon(delta)`` at Opacus's defaults (``eps_error=0.01``,
``delta_error=delta/1000``). Consecutive steps with equal (noise multiplier, sample
rate) are merged first, exactly as ``PRVAccountant.step`` merges them while training,
so a ledger that records one ``DPStep`` per round gives the same epsilon, bit for bit,
as the site's own ``PrivacyEngine.get_epsilon(delta)`` after the same rounds.

Tolerance. The value is PRV's *upper* bound: the true epsilon of the run lies at most
about ``2 * eps_error = 0.02`` below it, never above. The computation is deterministic:
the same history and delta give the same float in every call and every process with
the pinned opacus/numpy/scipy (tested); across other library versions or CPUs expect
agreement to about 1e-9 relative, so an auditor compares with ``rel=1e-6`` rather than
for equality. The clip norm does not enter epsilon (noise is calibrated to it); it is
recorded so the audit shows what was run.

Cost. One epsilon takes about 0.05-0.5 s (it grows with the number of steps and with
epsilon itself; see ``_memoize_rdp_orders``); results are cached per (merged history,
delta), so charging a site one more round costs one new evaluation, and sites that
share parameters share the cache.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

SIGMA_GRID = 1e-3
"""Resolution of ``noise_multiplier_for``: it returns a multiple of this."""
_GRID_PER_UNIT = 1000
SIGMA_MIN = 0.3
"""Smallest noise multiplier ``noise_multiplier_for`` returns. Below it PRV evaluations
get very slow and the guarantee is meaningless (epsilon in the hundreds), so a larger
budget is simply not spent in full."""
SIGMA_MAX = 1000.0
"""Largest noise multiplier ``noise_multiplier_for`` tries before giving up."""


class BudgetInfeasible(ValueError):
    """No noise multiplier keeps the planned rounds within the budget."""


@dataclass(frozen=True)
class DPStep:
    """One DP-SGD run of a site (normally one round): the mechanism's public parameters.

    ``steps`` Poisson-subsampled Gaussian steps with sampling rate ``sample_rate`` and
    noise standard deviation ``noise_multiplier * clip_norm`` on the sum of per-record
    gradients clipped to ``clip_norm``. Client-level DP of a whole update is the
    special case ``sample_rate=1, steps=1``.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "sample_rate", "clip_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            object.__setattr__(self, name, float(value))
        if isinstance(self.steps, bool) or not isinstance(self.steps, int):
            raise TypeError(f"steps must be an int, got {type(self.steps).__name__}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be positive and finite, got {self.noise_multiplier}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be positive and finite, got {self.clip_norm}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/msgpack values; floats round-trip exactly through JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DPStep:
        """Inverse of ``to_dict``; rejects missing or unknown keys."""
        keys = {"noise_multiplier", "sample_rate", "steps", "clip_norm"}
        if not isinstance(d, Mapping) or set(d) != keys:
            got = sorted(d) if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(f"a DPStep needs exactly the keys {sorted(keys)}, got {got}")
        return cls(
            noise_multiplier=d["noise_multiplier"],
            sample_rate=d["sample_rate"],
            steps=d["steps"],
            clip_norm=d["clip_norm"],
        )


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _check_budget(epsilon_budget: float) -> float:
    if isinstance(epsilon_budget, bool) or not isinstance(epsilon_budget, int | float):
        raise TypeError("epsilon_budget must be a number")
    if not (math.isfinite(epsilon_budget) and epsilon_budget > 0):
        raise ValueError(f"epsilon_budget must be positive and finite, got {epsilon_budget}")
    return float(epsilon_budget)


def accountant_history(history: Iterable[DPStep]) -> tuple[tuple[float, float, int], ...]:
    """The history as Opacus's PRV accountant holds it: (sigma, q, steps) tuples,
    zero-step runs dropped and consecutive runs with equal (sigma, q) merged."""
    merged: list[tuple[float, float, int]] = []
    for step in history:
        if not isinstance(step, DPStep):
            raise TypeError(f"history entries must be DPStep, got {type(step).__name__}")
        if step.steps == 0:
            continue
        if merged and merged[-1][0] == step.noise_multiplier and merged[-1][1] == step.sample_rate:
            sigma, q, n = merged[-1]
            merged[-1] = (sigma, q, n + step.steps)
        else:
            merged.append((step.noise_multiplier, step.sample_rate, step.steps))
    return tuple(merged)


def _memoize_rdp_orders() -> None:
    """Memoize Opacus's per-order RDP of the subsampled Gaussian, once per process.

    ``PRVAccountant`` sizes its discretisation domain with an RDP bound, and that bound
    (a pure-Python series per order, independent of the number of steps) is ~75% of an
    epsilon evaluation. A site's rounds share (q, sigma), so caching
    ``_compute_rdp(q, sigma, alpha)`` makes each further evaluation ~4x cheaper. The
    wrapped function is pure, so every result is bit-identical (tested); the cache is
    bounded.
    """
    from opacus.accountants.analysis import rdp

    if not hasattr(rdp._compute_rdp, "cache_info"):
        rdp._compute_rdp = lru_cache(maxsize=200_000)(rdp._compute_rdp)


@lru_cache(maxsize=4096)
def _prv_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    # Imported here: opacus pulls in torch (seconds), which callers that never compute
    # an epsilon (CLI, audit export) should not pay for.
    from opacus.accountants import PRVAccountant

    _memoize_rdp_orders()
    accountant = PRVAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        # Overflow warnings of the PRV discretisation at tiny sigma; the result is inf.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        eps = float(accountant.get_epsilon(delta))
    if math.isnan(eps):
        return math.inf
    return max(eps, 0.0)


def epsilon_spent(history: Sequence[DPStep], delta: float) -> float:
    """Epsilon (at ``delta``) of all the runs in ``history`` composed; 0.0 when empty.

    Equal to Opacus's ``PrivacyEngine.get_epsilon(delta)`` after the same runs (see the
    module docstring for the tolerance); ``inf`` when the noise is too small to bound.
    """
    delta = _check_delta(delta)
    merged = accountant_history(history)
    if not merged:
        return 0.0
    return _prv_epsilon(merged, delta)


def round_charge(history: Sequence[DPStep], step: DPStep, delta: float) -> float:
    """What one more run costs: epsilon(history + [step]) - epsilon(history).

    This is the number the ledger records per round. Charges telescope, so their sum is
    the site's total up to float rounding; the cap itself is checked on the total
    (``fits_budget``). Clamped at 0 in case PRV's discretisation ever made the total
    dip (not observed).
    """
    return charge_increase(epsilon_spent([*history, step], delta), epsilon_spent(history, delta))


def fits_budget(history: Sequence[DPStep], step: DPStep, epsilon_budget: float, delta: float) -> bool:
    """True when running ``step`` after ``history`` keeps the total within the budget."""
    budget = _check_budget(epsilon_budget)
    return within_budget(epsilon_spent([*history, step], delta), budget)


# ---------------------------------------------------------------- charges and the budget

BUDGET_SLACK = 1e-9
"""How far a cumulative epsilon may pass a budget and still be within it.

PRV totals are floats computed by several parties (site, leader, auditor) in separate
processes; a charge that lands exactly on the budget must not be refused for the last
bit of rounding. Every budget comparison goes through ``within_budget``."""

CHARGE_FIELDS = ("noise_multiplier", "sample_rate", "steps", "clip_norm")
"""The DP parameters of one run as a ledger entry records them (with ``delta``)."""


def within_budget(total: float, budget: float) -> bool:
    """True when a cumulative epsilon of ``total`` is within ``budget``."""
    return total <= budget + BUDGET_SLACK


def dp_step(params: Mapping[str, Any]) -> DPStep:
    """A recorded charge's DP parameters as a ``DPStep``.

    The leader, the site and an auditor all convert a ledger entry through here, so they
    feed the accountant exactly the same values."""
    return DPStep(float(params["noise_multiplier"]), float(params["sample_rate"]),
                  int(params["steps"]), float(params["clip_norm"]))


def charge_increase(total: float, spent: float) -> float:
    """The recorded ``epsilon`` of a charge: the rise of the site's cumulative epsilon.

    PRV totals do not add up, so the increase is a difference of totals (never negative).
    """
    return max(0.0, total - spent)


def compute_charge(history: Sequence[Mapping[str, Any]], step: Mapping[str, Any], delta: float,
                   spent: float) -> dict[str, float]:
    """The ledger entry of one more run: its parameters, its increase and the new total."""
    run = dp_step(step)
    total = epsilon_spent([*map(dp_step, history), run], delta)
    return {"noise_multiplier": run.noise_multiplier, "sample_rate": run.sample_rate,
            "steps": float(run.steps), "clip_norm": run.clip_norm, "delta": delta,
            "epsilon": charge_increase(total, spent), "epsilon_total": total}


def can_afford_another(history: Sequence[Mapping[str, Any]], delta: float, budget: float) -> bool:
    """Whether one more run like the site's last keeps its cumulative epsilon in budget."""
    if not history:
        return True
    return within_budget(compute_charge(history, history[-1], delta, 0.0)["epsilon_total"], budget)


def noise_multiplier_for(
    epsilon_budget: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    planned_rounds: int,
    history: Sequence[DPStep] = (),
    clip_norm: float = 1.0,
) -> float:
    """The smallest noise multiplier (a multiple of ``SIGMA_GRID``, at least ``SIGMA_MIN``)
    with which ``history`` plus ``planned_rounds`` more rounds stays within the budget.

    Why a search: Opacus's ``make_private_with_epsilon`` plans for a fresh engine only;
    a site that already spent part of its budget, or plans a number of rounds, needs the
    sigma that accounts for both. The search is deterministic (extrapolation of log
    epsilon over log sigma to bracket the budget, then interpolation safeguarded by
    bisection on the grid), and the answer is checked on both sides: epsilon at the
    result is within the budget and epsilon one grid step below is not (unless the
    result is ``SIGMA_MIN``). It takes about 5-8 epsilon evaluations (0.5-2 s).

    Raises ``BudgetInfeasible`` when the history alone already exceeds the budget or
    even ``SIGMA_MAX`` does not fit.
    """
    budget = _check_budget(epsilon_budget)
    delta = _check_delta(delta)
    if isinstance(planned_rounds, bool) or not isinstance(planned_rounds, int) or planned_rounds < 1:
        raise ValueError(f"planned_rounds must be an int >= 1, got {planned_rounds!r}")
    if isinstance(steps_per_round, bool) or not isinstance(steps_per_round, int) or steps_per_round < 1:
        raise ValueError(f"steps_per_round must be an int >= 1, got {steps_per_round!r}")
    DPStep(1.0, sample_rate, steps_per_round, clip_norm)  # validates sample_rate and clip_norm
    history = tuple(history)
    spent = epsilon_spent(history, delta)
    if spent > budget:
        raise BudgetInfeasible(f"the site has already spent epsilon {spent:.4f} of its budget {budget:.4f}")

    def eps_at(n: int) -> float:
        step = DPStep(n / _GRID_PER_UNIT, sample_rate, steps_per_round, clip_norm)
        return epsilon_spent(history + (step,) * planned_rounds, delta)

    n = _search(eps_at, budget)
    if n is None:
        raise BudgetInfeasible(
            f"{planned_rounds} rounds of {steps_per_round} steps at sample rate {sample_rate} "
            f"exceed epsilon {budget} (already spent {spent:.4f}) even at noise multiplier {SIGMA_MAX}"
        )
    return n / _GRID_PER_UNIT


def _search(eps_at: Callable[[int], float], budget: float) -> int | None:
    """Smallest grid point n in [n_min, n_max] with eps_at(n) <= budget (None if none).

    Epsilon falls as sigma grows. Evaluations are cheap at large sigma (small epsilon)
    and slow at small sigma, so the search starts at sigma 4 and extrapolates
    epsilon ~ sigma^-p (p from the last two points) towards the budget, aiming just past
    it so that the first bracket is already tight; ``_refine`` then closes it.
    """
    n_min = round(SIGMA_MIN * _GRID_PER_UNIT)
    n_max = round(SIGMA_MAX * _GRID_PER_UNIT)
    seen: dict[int, float] = {}
    n = 4 * _GRID_PER_UNIT
    while True:
        seen[n] = eps_at(n)
        fits = sorted(k for k, e in seen.items() if e <= budget)
        fails = sorted(k for k, e in seen.items() if e > budget)
        if fits and fails:
            lo, hi = fails[-1], fits[0]
            return _refine(eps_at, budget, lo, seen[lo], hi, seen[hi])
        if fails:  # go up
            lo = fails[-1]
            if lo >= n_max:
                return None
            other = fails[-2] if len(fails) > 1 else None
            guess = _extrapolate(seen, lo, other, budget, 1.05, fallback=2 * lo)
            n = min(n_max, 4 * lo, max(lo + 1, guess))
        else:  # go down
            hi = fits[0]
            if hi <= n_min:
                return hi
            other = fits[1] if len(fits) > 1 else None
            guess = _extrapolate(seen, hi, other, budget, 0.95, fallback=hi // 2)
            n = max(n_min, hi // 4, min(hi - 1, guess))


def _extrapolate(
    seen: dict[int, float], base: int, other: int | None, budget: float, aim: float, fallback: int
) -> int:
    """Grid point where epsilon ~ c * n^-p, through ``base``, reaches the budget, times
    ``aim``; p is the slope between ``base`` and ``other`` in log-log (1 without one)."""
    e1 = seen[base]
    if not (math.isfinite(e1) and e1 > 0):
        return fallback
    p = 1.0
    if other is not None:
        e2 = seen[other]
        if math.isfinite(e2) and e2 > 0 and e2 != e1:
            p = min(3.0, max(0.5, -(math.log(e1) - math.log(e2)) / (math.log(base) - math.log(other))))
    return round(base * (e1 / budget) ** (1.0 / p) * aim)


def _refine(eps_at: Callable[[int], float], budget: float, lo: int, e_lo: float, hi: int, e_hi: float) -> int:
    """Smallest grid point that fits, given eps_at(lo) > budget >= eps_at(hi)."""
    last_set_hi = True
    widths = [hi - lo]
    while hi - lo > 1:
        if len(widths) >= 3 and widths[-1] * 2 > widths[-3]:
            n = (lo + hi) // 2  # interpolation is not closing the bracket: bisect
        else:
            n = _interpolate(budget, lo, e_lo, hi, e_hi, round_down=last_set_hi)
        n = min(max(n, lo + 1), hi - 1)
        e = eps_at(n)
        if e <= budget:
            hi, e_hi, last_set_hi = n, e, True
        else:
            lo, e_lo, last_set_hi = n, e, False
        widths.append(hi - lo)
    return hi


def _interpolate(budget: float, lo: int, e_lo: float, hi: int, e_hi: float, round_down: bool) -> int:
    """Where log epsilon, linear in log sigma between the bracket ends, meets the budget.

    Rounded towards the end that was not moved last, so that a good estimate closes
    the bracket from both sides in two evaluations.
    """
    if not (math.isfinite(e_lo) and e_lo > 0 and e_hi > 0 and budget > 0):
        return (lo + hi) // 2
    t = (math.log(e_lo) - math.log(budget)) / (math.log(e_lo) - math.log(e_hi))
    x = math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))
    return math.floor(x) if round_down else math.ceil(x)
