"""The leader's side of a round's aggregation, stage by stage, without any network.

`SecureAggregation` runs SecAgg+ (advertise, share keys, masked input, unmask): the
leader only ever holds masked vectors and, after unmasking, their sum. Nothing here
can decode one site's update: the only decode is of `SecAggServer.finish()`'s total.
`PlainAggregation` (secure aggregation switched off, for comparison) takes the
sparse float32 values in the clear. Both end in the same mean delta on the full model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from coordinator import wire
from coordinator.aggregate import PlainSum, weighted_mean
from privacy import secagg
from privacy.plan import RoundPlan
from privacy.prg import apply_masks
from privacy.sparsify import scatter

SECURE_STAGES = ("advertise", "share", "masked", "unmask")


class AggregationAbort(Exception):
    """The round cannot be aggregated (too few survivors); abort and retry it."""


class PlainAggregation:
    stages = ("collect",)

    def __init__(self, plan: RoundPlan, participants: frozenset[str]) -> None:
        self.plan = plan
        self.stage = "collect"
        self.participants = participants
        self.acc = PlainSum(plan.k)
        self.answered: set[str] = set()

    def expected(self) -> frozenset[str]:
        return self.participants

    def payload_for(self, site: str) -> dict[str, Any]:
        return {}

    def accept(self, site: str, body: Mapping[str, Any]) -> None:
        values = wire.decode_update(body.get("update"), self.plan.k)
        n = body.get("num_examples")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= wire.MAX_EXAMPLES:
            raise wire.WireError("malformed", "num_examples must be a positive integer")
        if float(np.abs(values).max(initial=0.0)) > self.plan.clip * (1 + 1e-6):
            raise wire.WireError("out_of_range", f"values exceed the round's clip {self.plan.clip}")
        self.acc.add(values, min(float(n), self.plan.max_weight))
        self.answered.add(site)

    def close_stage(self) -> bool:
        """End the current stage; True when aggregation is complete."""
        return True

    def survivors(self) -> list[str]:
        return sorted(self.answered)

    def mean_delta(self) -> np.ndarray:
        total, weight = self.acc.result()
        return scatter(weighted_mean(total, weight), self.plan.indices, self.plan.dim)


class SecureAggregation:
    stages = SECURE_STAGES

    def __init__(self, plan: RoundPlan, identity_keys: Mapping[str, str],
                 masker: secagg.MaskApplier = apply_masks) -> None:
        if plan.secagg is None or plan.codec is None:
            raise ValueError("the plan has no secure aggregation parameters")
        self.plan = plan
        keys = {s: bytes.fromhex(k) for s, k in identity_keys.items()}
        self.server = secagg.SecAggServer(plan.secagg, keys, masker)
        self.stage = "advertise"
        self._expected: frozenset[str] = frozenset(plan.secagg.participants)
        self._payloads: dict[str, dict[str, Any]] = {}
        self.answered: set[str] = set()
        self._result: secagg.AggregateResult | None = None

    def expected(self) -> frozenset[str]:
        return self._expected

    def payload_for(self, site: str) -> dict[str, Any]:
        return self._payloads.get(site, {})

    def accept(self, site: str, body: Mapping[str, Any]) -> None:
        msg = body.get("secagg")
        if not isinstance(msg, dict):
            raise wire.WireError("malformed", "a secure-aggregation message is required")
        try:
            if self.stage == "advertise":
                advert = secagg.Advertisement.from_wire(msg)
                self._same_sender(site, advert.client_id)
                self.server.receive_advertisement(advert)
            elif self.stage == "share":
                shares = secagg.EncryptedShares.from_wire(msg)
                self._same_sender(site, shares.sender)
                self.server.receive_shares(shares)
            elif self.stage == "masked":
                masked = secagg.MaskedInput.from_wire(msg)
                self._same_sender(site, masked.sender)
                self.server.receive_masked_input(masked)
            else:
                response = secagg.UnmaskResponse.from_wire(msg)
                self._same_sender(site, response.sender)
                self.server.receive_unmask(response)
        except (secagg.InvalidMessage, secagg.StageError, ValueError, TypeError) as exc:
            if isinstance(exc, wire.WireError):
                raise
            raise wire.WireError("bad_secagg", f"{exc.__class__.__name__}: {exc}") from None
        self.answered.add(site)

    @staticmethod
    def _same_sender(site: str, claimed: str) -> None:
        if site != claimed:
            raise wire.WireError("bad_secagg", f"message names {claimed!r}, not the caller {site!r}")

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
                request = self.server.close_masked_input()
                wired = request.to_wire()
                self._next("unmask", {s: {"request": wired} for s in self.server.unmask_recipients})
            else:
                self._result = self.server.finish()
                return True
        except secagg.ProtocolAbort as exc:
            raise AggregationAbort(str(exc)) from None
        if len(self._expected) < self.plan.secagg.threshold:  # type: ignore[union-attr]
            raise AggregationAbort(f"{len(self._expected)} sites left at {self.stage}, "
                                   f"threshold {self.plan.secagg.threshold}")  # type: ignore[union-attr]
        return False

    def _next(self, stage: str, payloads: dict[str, dict[str, Any]]) -> None:
        self.stage = stage
        self._payloads = payloads
        self._expected = frozenset(payloads)
        self.answered = set()

    def survivors(self) -> list[str]:
        """Sites whose masked input is in the sum."""
        return sorted(self._result.survivors) if self._result else []

    def mean_delta(self) -> np.ndarray:
        if self._result is None:
            raise RuntimeError("not unmasked yet")
        values, weight = self.plan.codec.decode(self._result.total)  # type: ignore[union-attr]
        if not weight > 0:
            raise AggregationAbort("the summed weight is not positive")
        return scatter(values / weight, self.plan.indices, self.plan.dim)
