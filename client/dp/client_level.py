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

import math
import secrets
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from client.dp.ledger import LedgerBacked, PrivacyLedger
from client.training.protocols import ChargePreview, EvalResult, FitResult, LocalTrainer, Parameters
from privacy.accounting import DPStep


class ClientLevelDP:
    """Clip a whole model update to L2 norm ``clip_norm`` and add N(0, (sigma * clip)^2)
    to every coordinate: the Gaussian mechanism on the site's update, for training code
    the agent cannot instrument (a hosted Flower app).

    What it protects: the site's *whole* contribution of one round (client-level), not
    single records, and locally: the noise is added on the site, so the guarantee holds
    even against the other parties and the coordinator, without relying on secure
    aggregation. In the ledger one round is ``DPStep(noise_multiplier, sample_rate=1,
    steps=1, clip_norm)`` (``step()``): no subsampling amplification, since the site
    takes part with all its data; rounds compose like any other history. It is costly:
    with a handful of sites the noise each site must add for a useful epsilon swamps
    the update (20 silos, 100 rounds, sigma 1 gave epsilon ~96), which is why built-in
    tasks use record-level DP-SGD instead.
    """

    def __init__(self, clip_norm: float, noise_multiplier: float, rng: np.random.Generator) -> None:
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"clip_norm must be positive and finite, got {clip_norm!r}")
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be >= 0 and finite, got {noise_multiplier!r}")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self._rng = rng

    def step(self) -> DPStep:
        """The ledger entry of one privatized round."""
        return DPStep(self.noise_multiplier, 1.0, 1, self.clip_norm)

    def __call__(self, update: np.ndarray) -> np.ndarray:
        """The privatized copy of a 1-D update vector (float64 math, float32 out)."""
        u = np.asarray(update, dtype=np.float64)
        if u.ndim != 1:
            raise ValueError("update must be a 1-D vector")
        if not np.all(np.isfinite(u)):
            raise ValueError("update contains NaN or infinity")
        norm = float(np.linalg.norm(u))
        clipped = u * min(1.0, self.clip_norm / norm) if norm > 0 else u.copy()
        noise = self._rng.normal(0.0, self.noise_multiplier * self.clip_norm, size=u.shape)
        return (clipped + noise).astype(np.float32)

    def privatize_params(self, base: Parameters, trained: Parameters) -> Parameters:
        """``base + privatized(trained - base)`` over all arrays jointly (one norm for
        the whole model), for the fit result of any ``LocalTrainer``."""
        if set(base) != set(trained):
            raise ValueError("base and trained parameters have different names")
        names = list(trained)
        flat = np.concatenate(
            [(np.asarray(trained[k], np.float64) - np.asarray(base[k], np.float64)).ravel() for k in names]
        )
        private = self(flat)
        out: Parameters = {}
        offset = 0
        for k in names:
            shape = np.shape(trained[k])
            size = int(np.prod(shape))
            out[k] = (
                np.asarray(base[k], np.float32) + private[offset : offset + size].reshape(shape)
            ).astype(np.float32)
            offset += size
        return out


MECHANISM = "client-level"
"""The ``mechanism`` of the plan in the state file: never equal to DP-SGD's plan, so a
switch of mechanism re-plans sigma over the history already spent."""

CLIENT_LEVEL_METRIC = "dp_client_level"
"""Metric set to 1.0 by this trainer: the dp_* numbers describe client-level DP."""


class ClientLevelDPTrainer(LedgerBacked):
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
        self.inner = inner
        self._rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        self._lock = threading.Lock()
        self.ledger = PrivacyLedger(
            state_path, epsilon, delta, planned_rounds, clip_norm,
            sample_rate=1.0, steps_per_round=1, mechanism=MECHANISM, header={"level": "client"},
        )

    @property
    def level(self) -> str:
        """What the guarantee protects: a site's whole update per round."""
        return "client"

    def _mechanism(self) -> ClientLevelDP:
        return ClientLevelDP(self.ledger.clip_norm, self.ledger.sigma, self._rng)

    def preview_charge(self, config: Mapping[str, Any]) -> ChargePreview:
        """The round's mechanism and epsilon charge, without training, so the agent can
        decline a round it cannot afford; ``config`` does not change the cost."""
        return self.ledger.preview(self._mechanism().step())

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
        # Write-ahead: the charge is on disk before the update exists.
        spent = self.ledger.charge(step)
        try:
            result = self.inner.fit(params, config)
            private = mechanism.privatize_params(params, result.params)
        except Exception:
            self.ledger.refund()  # nothing was released
            raise

        # The inner trainer's own dp_* keys would be mistaken for this release's.
        metrics = {k: float(v) for k, v in result.metrics.items() if not k.startswith("dp_")}
        metrics.update(self.ledger.release_metrics(step, spent))
        metrics[CLIENT_LEVEL_METRIC] = 1.0
        return FitResult(params=private, num_examples=result.num_examples, metrics=metrics)
