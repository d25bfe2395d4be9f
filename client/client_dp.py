"""Client-level DP for training code the agent does not control (a hosted Flower app).

Why a wrapper: a Flower ``ClientApp`` trains by itself, so the agent cannot clip and
noise per-record gradients inside it. What it can protect is what leaves the site: the
round's whole update. ``ClientLevelDPTrainer`` wraps any ``LocalTrainer``, lets it
train, then clips the update (trained - base) to an L2 norm and adds Gaussian noise
(``ClientLevelDP``). That guarantee is *client-level*: it hides the site's whole
contribution to a round, not just one record, and its epsilon is per site, so with a
handful of sites the noise it needs is large. Because the level matters to whoever
reads the epsilon, every fit reports ``dp_client_level = 1.0`` next to the usual
``dp_*`` metrics (metrics travel to the leader as floats, so the label is a number;
record-level DP-SGD sends no such key).

Accounting mirrors ``DPTorchTrainer``: one ``DPStep(sigma, sample_rate=1, steps=1,
clip)`` per round (the site takes part with all its data, so there is no subsampling
amplification), sigma chosen once for ``planned_rounds`` with ``noise_multiplier_for``,
the history kept in the same JSON ledger format with atomic writes, and the charge
written before the inner trainer runs. So a restarted agent continues the same
accounting, and a site that moves between a built-in task and a Flower app keeps one
history, as the leader's replicated ledger does. Unlike DP-SGD, the mechanism runs
*after* training: if the inner fit or the privatization raises, nothing was released
and the charge is taken back (the leader charges nothing either, as no update was sent).

Noise comes from numpy's generator seeded with 128 bits from ``secrets`` unless the
caller passes ``rng`` (simulations and tests only). Each privatized release draws fresh
noise from that one stream; noise reused across two releases would cancel in their
difference and expose the clipped updates.
"""

from __future__ import annotations

import json
import math
import secrets
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from client.dp import (
    STATE_FORMAT,
    BudgetExceeded,
    ChargePreview,
    ClientLevelDP,
    DPStateError,
    _write_atomic,
)
from client.sigma_cache import planned_noise_multiplier
from client.training import EvalResult, FitResult, LocalTrainer, Parameters
from privacy.accounting import BudgetInfeasible, DPStep, epsilon_spent

MECHANISM = "client-level"
"""The ``mechanism`` of the plan in the state file: never equal to DP-SGD's plan, so a
switch of mechanism re-plans sigma over the history already spent."""

CLIENT_LEVEL_METRIC = "dp_client_level"
"""Metric set to 1.0 by this trainer: the dp_* numbers describe client-level DP."""


class ClientLevelDPTrainer:
    """A ``LocalTrainer`` that releases ``inner``'s updates under client-level DP.

    ``epsilon``/``delta`` is the site's total budget over all rounds; the noise
    multiplier is the smallest that fits ``planned_rounds`` rounds into what the ledger
    at ``state_path`` leaves of it, computed once and kept in that file until the plan
    (budget, delta, clip, rounds) changes. The round config is passed to ``inner``
    unchanged; local epochs and learning rate do not change the cost, which is one
    Gaussian release per round.
    """

    def __init__(
        self,
        inner: LocalTrainer,
        epsilon: float,
        delta: float,
        planned_rounds: int,
        state_path: Path | str,
        clip_norm: float = 1.0,
        *,
        rng: np.random.Generator | None = None,
    ) -> None:
        if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon must be positive and finite, got {epsilon!r}")
        if not (isinstance(delta, int | float) and 0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if isinstance(planned_rounds, bool) or not isinstance(planned_rounds, int) or planned_rounds < 1:
            raise ValueError(f"planned_rounds must be an int >= 1, got {planned_rounds!r}")
        if not (isinstance(clip_norm, int | float) and math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"clip_norm must be positive and finite, got {clip_norm!r}")
        self.inner = inner
        self._budget = float(epsilon)
        self._delta = float(delta)
        self._planned_rounds = planned_rounds
        self._clip = float(clip_norm)
        self._state_path = Path(state_path)
        self._rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        self._lock = threading.Lock()
        self._history: list[DPStep] = []
        self._sigma = self._load_or_plan()

    # ----------------------------------------------------------------- state file

    def _plan(self) -> dict[str, Any]:
        return {
            "mechanism": MECHANISM,
            "epsilon_budget": self._budget,
            "delta": self._delta,
            "sample_rate": 1.0,
            "clip_norm": self._clip,
            "planned_rounds": self._planned_rounds,
            "steps_per_round": 1,
        }

    def _load_or_plan(self) -> float:
        stored: dict[str, Any] = {}
        if self._state_path.exists():
            try:
                stored = json.loads(self._state_path.read_bytes())
                if not isinstance(stored, dict) or stored.get("format") != STATE_FORMAT:
                    got = stored.get("format") if isinstance(stored, dict) else type(stored).__name__
                    raise ValueError(f"format is {got!r}, expected {STATE_FORMAT!r}")
                self._history = [DPStep.from_dict(d) for d in stored["history"]]
            except (OSError, ValueError, TypeError, KeyError) as exc:
                raise DPStateError(
                    f"cannot read the privacy ledger {self._state_path}: {exc}. Refusing to start "
                    "(a reset would forget the privacy already spent); restore it from backup"
                ) from exc
        if stored.get("plan") == self._plan() and isinstance(stored.get("noise_multiplier"), float):
            self._sigma = stored["noise_multiplier"]
            return self._sigma
        remaining = max(1, self._planned_rounds - len(self._history))
        try:
            sigma = planned_noise_multiplier(
                self._budget, self._delta, 1.0, 1, remaining, self._history, self._clip
            )
        except BudgetInfeasible:
            # Nothing fits any more: keep a valid sigma (evaluation still works) and let
            # every fit refuse with BudgetExceeded.
            sigma = self._history[-1].noise_multiplier if self._history else 1.0
        self._sigma = sigma
        self._save()
        return sigma

    def _save(self) -> None:
        state = {
            "format": STATE_FORMAT,
            "level": "client",
            "plan": self._plan(),
            "noise_multiplier": self._sigma,
            "history": [s.to_dict() for s in self._history],
        }
        _write_atomic(self._state_path, json.dumps(state, indent=1, sort_keys=True).encode() + b"\n")

    # ------------------------------------------------------------------ accounting

    @property
    def level(self) -> str:
        """What the guarantee protects: a site's whole update per round."""
        return "client"

    @property
    def history(self) -> tuple[DPStep, ...]:
        """The site's ledger: one entry per released round, oldest first."""
        return tuple(self._history)

    @property
    def noise_multiplier(self) -> float:
        return self._sigma

    @property
    def sample_rate(self) -> float:
        return 1.0

    @property
    def clip_norm(self) -> float:
        return self._clip

    @property
    def delta(self) -> float:
        return self._delta

    @property
    def epsilon_budget(self) -> float:
        return self._budget

    @property
    def epsilon_spent(self) -> float:
        """Epsilon of the ledger so far, as the leader accounts the same history."""
        return epsilon_spent(self._history, self._delta)

    def _mechanism(self) -> ClientLevelDP:
        return ClientLevelDP(self._clip, self._sigma, self._rng)

    def preview_charge(self, config: Mapping[str, Any]) -> ChargePreview:
        """The round's mechanism and epsilon charge, without training, so the agent can
        decline a round it cannot afford; ``config`` does not change the cost."""
        step = self._mechanism().step()
        before = self.epsilon_spent
        after = epsilon_spent([*self._history, step], self._delta)
        return ChargePreview(step, max(after - before, 0.0))

    # --------------------------------------------------------------- LocalTrainer

    def initial_parameters(self) -> Parameters:
        return self.inner.initial_parameters()

    def evaluate(self, params: Parameters, config: Mapping[str, Any]) -> EvalResult:
        return self.inner.evaluate(params, config)

    def fit(self, params: Parameters, config: Mapping[str, Any]) -> FitResult:
        with self._lock:
            return self._fit(params, config)

    def _fit(self, params: Parameters, config: Mapping[str, Any]) -> FitResult:
        mechanism = self._mechanism()
        step = mechanism.step()
        spent = self.epsilon_spent
        total = epsilon_spent([*self._history, step], self._delta)
        if total > self._budget:
            raise BudgetExceeded(spent, self._budget, max(total - spent, 0.0))

        # Write-ahead: the charge is on disk before the update exists.
        self._history.append(step)
        try:
            self._save()
        except BaseException:
            self._history.pop()
            raise
        try:
            result = self.inner.fit(params, config)
            private = mechanism.privatize_params(params, result.params)
        except Exception:
            # Nothing was released: take the charge back. If that cannot be written,
            # the ledger keeps it (over-counting is safe, under-counting is not).
            self._history.pop()
            try:
                self._save()
            except OSError:
                self._history.append(step)
            raise

        eps_total = self.epsilon_spent
        # The inner trainer's own dp_* keys would be mistaken for this release's.
        metrics = {k: float(v) for k, v in result.metrics.items() if not k.startswith("dp_")}
        metrics.update(
            {
                "dp_noise_multiplier": step.noise_multiplier,
                "dp_sample_rate": step.sample_rate,
                "dp_steps": float(step.steps),
                "dp_clip_norm": step.clip_norm,
                "dp_delta": self._delta,
                "dp_epsilon": max(eps_total - spent, 0.0),
                "dp_epsilon_total": eps_total,
                CLIENT_LEVEL_METRIC: 1.0,
            }
        )
        return FitResult(params=private, num_examples=result.num_examples, metrics=metrics)
