"""The leader's aggregation, composed as stages: Sum (plain | SecAgg+) -> WeightedMean -> ServerOptimizer.

Like TensorFlow Federated's aggregation factories, each stage is given the one before it
instead of existing in parallel variants: `Aggregation(sum, WeightedMean(plan), optimizer)`
where the sum is `PlainSum` (secure aggregation switched off, for comparison: sparse
float32 values in the clear) or `SecureSum` (SecAgg+: advertise, share keys, masked
input, unmask). Both sums end in the same thing, the weighted sum of the survivors'
values on the round's index set and their summed weight, so everything after the sum is
written once.

`SecureSum` only ever holds masked vectors and, after unmasking, their sum: nothing here
can decode one site's update; the only decode is of `SecAggServer.finish()`'s total. No
I/O and no clock: the driver feeds it sites' messages and closes its stages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from coordinator import wire
from privacy import secagg
from privacy.plan import RoundPlan
from privacy.prg import apply_masks
from privacy.sparsify import scatter


class AggregationAbort(Exception):
    """The round cannot be aggregated (too few survivors, no weight); abort and retry it."""


class InvalidAggregate(AggregationAbort):
    """The unmasked sum is one that honest, clipped inputs cannot make: some survivor sent
    something else (a negative or oversized weight, values beyond the clip, garbage). The
    leader never sees which; `round.hostile` finds the site over the next attempts."""


def aggregate_problem(values: np.ndarray, weight: float, survivors: int,
                      plan: RoundPlan) -> str | None:
    """Why a decoded secure sum cannot come from `survivors` honest sites, or None.

    Each honest site sends its weight w in [1 / max_examples, 1] (its example count,
    capped and scaled) and its clipped values times w, each coordinate in [-w c, w c]
    for the round's clip c, all rounded stochastically to one quantum. So the summed
    weight W lies in [n / max_examples, n] and every coordinate of the sum within W c,
    give or take n quanta. This bounds what a site can do unseen: it can still move the
    sum anywhere inside that box (README, trust model), but no further.
    """
    codec = plan.codec
    if codec is None:
        return None
    n = survivors
    weight_slack = n / codec.weight_scale
    low, high = n / plan.max_weight, float(n)
    if not np.isfinite(weight) or weight < low - weight_slack:
        return (f"the summed weight {weight:.6g} is below the {low:.6g} that {n} sites send "
                "at least")
    if weight > high + weight_slack:
        return f"the summed weight {weight:.6g} is above the {high:.6g} that {n} sites send at most"
    limit = max(weight, 0.0) * plan.clip + n / codec.scale
    worst = float(np.abs(values).max(initial=0.0))
    if not np.isfinite(worst) or worst > limit * (1 + 1e-9):
        return (f"a coordinate of the sum is {worst:.6g}, beyond the {limit:.6g} that {n} "
                f"clipped inputs of summed weight {weight:.6g} can reach")
    return None


class Sum(Protocol):
    """The first stage: collects sites' messages stage by stage into one weighted sum."""

    stage: str
    answered: set[str]

    def expected(self) -> frozenset[str]:
        """The sites whose answer the current stage waits for."""
        ...

    def payload_for(self, site: str) -> Mapping[str, Any]:
        """What the current stage's task carries for `site` beyond the round's fields."""
        ...

    def accept(self, site: str, submit: wire.Submit) -> None:
        """Take one site's answer to the current stage; WireError (nothing changed) if bad."""
        ...

    def close_stage(self) -> bool:
        """End the current stage; True when the sum is complete."""
        ...

    def survivors(self) -> list[str]:
        """The sites whose update is in the sum."""
        ...

    def result(self) -> tuple[np.ndarray, float]:
        """The weighted sum of the survivors' values on the index set, and its weight."""
        ...


class PlainSum:
    """Updates in the clear (secure aggregation off), summed as they arrive; none is kept."""

    def __init__(self, plan: RoundPlan, participants: frozenset[str]) -> None:
        self.plan = plan
        self.stage = wire.PLAIN_STAGES[0]
        self.participants = participants
        self.answered: set[str] = set()
        self._total = np.zeros(plan.k, dtype=np.float64)
        self._weight = 0.0

    def expected(self) -> frozenset[str]:
        return self.participants

    def payload_for(self, site: str) -> Mapping[str, Any]:
        return {}

    def accept(self, site: str, submit: wire.Submit) -> None:
        values = wire.decode_update(submit.update, self.plan.k)
        if float(np.abs(values).max(initial=0.0)) > self.plan.clip * (1 + 1e-6):
            raise wire.WireError("out_of_range", f"values exceed the round's clip {self.plan.clip}")
        if submit.num_examples is None:
            raise wire.WireError("malformed", "num_examples must be a positive integer")
        weight = min(float(submit.num_examples), self.plan.max_weight)
        self._total += weight * values.astype(np.float64)
        self._weight += weight
        self.answered.add(site)

    def close_stage(self) -> bool:
        return True

    def survivors(self) -> list[str]:
        return sorted(self.answered)

    def result(self) -> tuple[np.ndarray, float]:
        return self._total, self._weight


class SecureSum:
    """SecAgg+ on the leader: one `SecAggServer` driven stage by stage."""

    def __init__(self, plan: RoundPlan, identity_keys: Mapping[str, str],
                 masker: secagg.MaskApplier = apply_masks) -> None:
        if plan.secagg is None or plan.codec is None:
            raise ValueError("the plan has no secure aggregation parameters")
        self.plan = plan
        keys = {s: bytes.fromhex(k) for s, k in identity_keys.items()}
        self.server = secagg.SecAggServer(plan.secagg, keys, masker)
        self.stage = wire.SECURE_STAGES[0]
        self._expected: frozenset[str] = frozenset(plan.secagg.participants)
        self._payloads: dict[str, dict[str, Any]] = {}
        self.answered: set[str] = set()
        self._result: secagg.AggregateResult | None = None

    def expected(self) -> frozenset[str]:
        return self._expected

    def payload_for(self, site: str) -> Mapping[str, Any]:
        return self._payloads.get(site, {})

    def accept(self, site: str, submit: wire.Submit) -> None:
        msg = submit.secagg
        if msg is None:
            raise wire.WireError("malformed", "a secure-aggregation message is required")
        server = self.server
        try:
            if self.stage == "advertise":
                server.receive_advertisement(secagg.Advertisement.from_wire(msg), sender=site)
            elif self.stage == "share":
                server.receive_shares(secagg.EncryptedShares.from_wire(msg), sender=site)
            elif self.stage == "masked":
                server.receive_masked_input(secagg.MaskedInput.from_wire(msg), sender=site)
            else:
                server.receive_unmask(secagg.UnmaskResponse.from_wire(msg), sender=site)
        except (secagg.InvalidMessage, secagg.StageError, ValueError, TypeError) as exc:
            if isinstance(exc, wire.WireError):
                raise
            raise wire.WireError("bad_secagg", f"{exc.__class__.__name__}: {exc}") from None
        self.answered.add(site)

    def close_stage(self) -> bool:
        """End the current stage; True when the sum has been unmasked."""
        try:
            if self.stage == "advertise":
                directories = self.server.close_advertise()
                self._next("share", {s: {"directory": d.to_wire()} for s, d in directories.items()})
            elif self.stage == "share":
                requests = self.server.close_share_keys()
                self._next("masked", {s: {"request": r.to_wire()} for s, r in requests.items()})
            elif self.stage == "masked":
                wired = self.server.close_masked_input().to_wire()
                self._next("unmask", {s: {"request": wired} for s in self.server.unmask_recipients})
            else:
                self._result = self.server.finish()
                return True
        except secagg.ProtocolAbort as exc:
            raise AggregationAbort(str(exc)) from None
        threshold = self.plan.secagg.threshold  # type: ignore[union-attr]
        if len(self._expected) < threshold:
            raise AggregationAbort(f"{len(self._expected)} sites left at {self.stage}, "
                                   f"threshold {threshold}")
        return False

    def _next(self, stage: str, payloads: dict[str, dict[str, Any]]) -> None:
        self.stage = stage
        self._payloads = payloads
        self._expected = frozenset(payloads)
        self.answered = set()

    def survivors(self) -> list[str]:
        """Sites whose masked input is in the sum."""
        return sorted(self._result.survivors) if self._result else []

    def result(self) -> tuple[np.ndarray, float]:
        """The decoded sum; InvalidAggregate when honest inputs could not have made it."""
        if self._result is None:
            raise RuntimeError("not unmasked yet")
        values, weight = self.plan.codec.decode(self._result.total)  # type: ignore[union-attr]
        problem = aggregate_problem(values, weight, len(self._result.survivors), self.plan)
        if problem is not None:
            raise InvalidAggregate(problem)
        return values, weight


@dataclass(frozen=True)
class WeightedMean:
    """Divides the sum by its weight and places it on the full model (zeros elsewhere)."""

    plan: RoundPlan

    def __call__(self, total: np.ndarray, weight: float) -> np.ndarray:
        if not weight > 0:
            raise AggregationAbort("the summed weight is not positive")
        return scatter(total / weight, self.plan.indices, self.plan.dim)


class ServerOptimizer(Protocol):
    """The last stage: a new global model from the base and the mean update."""

    def __call__(self, base: np.ndarray, mean_delta: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class ServerSGD:
    """FedAvg's server step: new = base + lr * mean delta (lr 1.0 is plain FedAvg)."""

    lr: float = 1.0

    def __call__(self, base: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        return (base.astype(np.float64) + self.lr * mean_delta).astype(np.float32)


class Aggregation:
    """Sum -> WeightedMean -> ServerOptimizer: the round's aggregation, stage by stage.

    The driver runs `sum`'s stages with the sites, then asks for the new model."""

    def __init__(self, summed: Sum, mean: WeightedMean, optimizer: ServerOptimizer) -> None:
        self.sum = summed
        self.mean = mean
        self.optimizer = optimizer

    @property
    def plan(self) -> RoundPlan:
        return self.mean.plan

    def mean_delta(self) -> np.ndarray:
        """The survivors' weighted mean update on the full model."""
        return self.mean(*self.sum.result())

    def new_model(self, base: np.ndarray) -> np.ndarray:
        return self.optimizer(base, self.mean_delta())


def make_aggregation(plan: RoundPlan, identity_keys: Mapping[str, str], server_lr: float = 1.0,
                     masker: secagg.MaskApplier = apply_masks) -> Aggregation:
    """The round's aggregation: a secure sum when the plan has SecAgg+ parameters, else plain.

    `identity_keys` names the participants (site -> enrolled Ed25519 key in hex)."""
    summed: Sum
    if plan.secagg is not None:
        summed = SecureSum(plan, identity_keys, masker)
    else:
        summed = PlainSum(plan, frozenset(identity_keys))
    return Aggregation(summed, WeightedMean(plan), ServerSGD(server_lr))
