"""A site's privacy ledger on disk, shared by record-level and client-level DP trainers.

Why one module: the ledger is what keeps the accounting honest across restarts and
across mechanisms (a site that moves from a built-in task to a Flower app keeps one
history), so it must be read, planned, charged and written one way. The file holds the
plan (budget, delta, sample rate, clip, rounds, steps per round), the noise multiplier
chosen for it and the history of ``DPStep``s. It is written atomically (the site's one
durable write, ``client.store.write_atomic``), and a round's charge is written *before*
the round runs (write-ahead), so a crash can only over-count, never under-count. A
charge is within the budget as the leader judges it (``within_budget``). An unreadable
file stops the site (``DPStateError``): a reset would forget the privacy already spent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.dp.sigma_cache import planned_noise_multiplier
from client.store import write_atomic
from client.training.protocols import ChargePreview
from privacy.accounting import BudgetInfeasible, DPStep, epsilon_spent, within_budget

STATE_FORMAT = "fedraft-dp-ledger/1"


class BudgetExceeded(RuntimeError):
    """The round would take the site past its privacy budget; nothing was trained."""

    def __init__(self, spent: float, budget: float, charge: float) -> None:
        self.spent = spent
        self.budget = budget
        self.charge = charge
        super().__init__(
            f"privacy budget exceeded: spent epsilon {spent:.4f} of {budget:.4f}, this round "
            f"would cost {charge:.4f} more (total {spent + charge:.4f}); refusing to train"
        )

    def __reduce__(self) -> tuple[type, tuple[float, float, float]]:
        return (type(self), (self.spent, self.budget, self.charge))


class DPStateError(RuntimeError):
    """The privacy state file is unreadable or inconsistent; never silently reset."""


def _positive_finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
        and value > 0


class PrivacyLedger:
    """The ledger file at ``path`` and the plan it was made for.

    ``epsilon``/``delta`` is the site's total budget over all rounds. The noise
    multiplier is the smallest that fits ``planned_rounds`` rounds of
    ``steps_per_round`` steps at ``sample_rate`` into what the history leaves of it;
    it is computed once and kept in the file until the plan changes. ``mechanism``
    (None for DP-SGD) is part of the plan, so switching mechanism re-plans sigma over
    the history already spent. ``header`` is written beside the plan, for people.
    """

    def __init__(
        self,
        path: Path | str,
        epsilon: float,
        delta: float,
        planned_rounds: int,
        clip_norm: float,
        *,
        sample_rate: float,
        steps_per_round: int,
        mechanism: str | None = None,
        header: Mapping[str, Any] | None = None,
    ) -> None:
        if not _positive_finite(epsilon):
            raise ValueError(f"epsilon must be positive and finite, got {epsilon!r}")
        if not (isinstance(delta, int | float) and 0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if isinstance(planned_rounds, bool) or not isinstance(planned_rounds, int) or planned_rounds < 1:
            raise ValueError(f"planned_rounds must be an int >= 1, got {planned_rounds!r}")
        if not _positive_finite(clip_norm):
            raise ValueError(f"clip_norm must be positive and finite, got {clip_norm!r}")
        self.path = Path(path)
        self.budget = float(epsilon)
        self.delta = float(delta)
        self.planned_rounds = planned_rounds
        self.clip_norm = float(clip_norm)
        self.sample_rate = float(sample_rate)
        self.steps_per_round = int(steps_per_round)
        self._mechanism = mechanism
        self._header = dict(header or {})
        self.history: list[DPStep] = []
        self.sigma = 1.0
        self.sigma = self._load_or_plan()

    def plan(self) -> dict[str, Any]:
        mechanism = {} if self._mechanism is None else {"mechanism": self._mechanism}
        return {
            **mechanism,
            "epsilon_budget": self.budget,
            "delta": self.delta,
            "sample_rate": self.sample_rate,
            "clip_norm": self.clip_norm,
            "planned_rounds": self.planned_rounds,
            "steps_per_round": self.steps_per_round,
        }

    def _load_or_plan(self) -> float:
        stored: dict[str, Any] = {}
        if self.path.exists():
            try:
                stored = json.loads(self.path.read_bytes())
                if not isinstance(stored, dict) or stored.get("format") != STATE_FORMAT:
                    got = stored.get("format") if isinstance(stored, dict) else type(stored).__name__
                    raise ValueError(f"format is {got!r}, expected {STATE_FORMAT!r}")
                self.history = [DPStep.from_dict(d) for d in stored["history"]]
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
                raise DPStateError(
                    f"cannot read the privacy ledger {self.path}: {exc}. Refusing to start "
                    "(a reset would forget the privacy already spent); restore it from backup"
                ) from exc
        if stored.get("plan") == self.plan() and isinstance(stored.get("noise_multiplier"), float):
            return stored["noise_multiplier"]
        remaining = max(1, self.planned_rounds - len(self.history))
        try:
            sigma = planned_noise_multiplier(
                self.budget, self.delta, self.sample_rate, self.steps_per_round, remaining,
                self.history, self.clip_norm,
            )
        except BudgetInfeasible:
            # Nothing fits any more: keep a valid sigma (evaluation still works) and let
            # every fit refuse with BudgetExceeded.
            sigma = self.history[-1].noise_multiplier if self.history else 1.0
        self.sigma = sigma
        self.save()
        return sigma

    def save(self) -> None:
        state = {
            **self._header,
            "format": STATE_FORMAT,
            "plan": self.plan(),
            "noise_multiplier": self.sigma,
            "history": [s.to_dict() for s in self.history],
        }
        # 0600, as it always was: the history shows how the site's records were used
        write_atomic(self.path, json.dumps(state, indent=1, sort_keys=True).encode() + b"\n",
                     mode=0o600)

    @property
    def epsilon_spent(self) -> float:
        """Epsilon of the history so far, as the leader accounts the same history."""
        return epsilon_spent(self.history, self.delta)

    def preview(self, step: DPStep) -> ChargePreview:
        """What adding `step` would cost, without charging it."""
        before = self.epsilon_spent
        after = epsilon_spent([*self.history, step], self.delta)
        return ChargePreview(step, max(after - before, 0.0))

    def charge(self, step: DPStep) -> float:
        """Write `step` ahead of the round it pays for; returns epsilon spent before it.

        BudgetExceeded (nothing written) if it would take the site past its budget."""
        spent = self.epsilon_spent
        total = epsilon_spent([*self.history, step], self.delta)
        if not within_budget(total, self.budget):  # the slack the leader allows too
            raise BudgetExceeded(spent, self.budget, max(total - spent, 0.0))
        self.history.append(step)
        try:
            self.save()
        except BaseException:
            self.history.pop()
            raise
        return spent

    def refund(self) -> None:
        """Take back the last charge when nothing was released. If that cannot be
        written the ledger keeps it (over-counting is safe, under-counting is not)."""
        step = self.history.pop()
        try:
            self.save()
        except OSError:
            self.history.append(step)

    def release_metrics(self, step: DPStep, spent_before: float) -> dict[str, float]:
        """The dp_* metrics of one charged round, as the leader reads them."""
        total = self.epsilon_spent
        return {
            "dp_noise_multiplier": step.noise_multiplier,
            "dp_sample_rate": step.sample_rate,
            "dp_steps": float(step.steps),
            "dp_clip_norm": step.clip_norm,
            "dp_delta": self.delta,
            "dp_epsilon": max(total - spent_before, 0.0),
            "dp_epsilon_total": total,
        }


class LedgerBacked:
    """The read-only accounting view every DP trainer offers, served by its ledger."""

    ledger: PrivacyLedger

    @property
    def history(self) -> tuple[DPStep, ...]:
        """The site's ledger: one entry per charged round, oldest first."""
        return tuple(self.ledger.history)

    @property
    def noise_multiplier(self) -> float:
        return self.ledger.sigma

    @property
    def sample_rate(self) -> float:
        return self.ledger.sample_rate

    @property
    def clip_norm(self) -> float:
        return self.ledger.clip_norm

    @property
    def delta(self) -> float:
        return self.ledger.delta

    @property
    def epsilon_budget(self) -> float:
        return self.ledger.budget

    @property
    def epsilon_spent(self) -> float:
        """Epsilon of the ledger so far, as the leader accounts the same history."""
        return self.ledger.epsilon_spent
