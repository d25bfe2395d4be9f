"""A round's public plan: what every party derives identically from public inputs.

The leader and each site compute the same plan from the `round_open` record (round,
attempt, term, seed, participants, configuration) and the public model history (the
last global change), so the index set, the encoding and the SecAgg+ parameters are
agreed without another message and depend on no site's data.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from privacy.encoding import FixedPointCodec
from privacy.secagg import SecAggParams, default_degree, default_threshold, make_context
from privacy.sparsify import apply_error_feedback, clip_values, new_residual, project, public_index_set


@dataclass(frozen=True)
class RoundPlan:
    dim: int
    indices: np.ndarray
    clip: float
    max_weight: float
    error_feedback: bool
    codec: FixedPointCodec | None
    secagg: SecAggParams | None
    residual_decay: float = 1.0

    @property
    def k(self) -> int:
        return int(self.indices.size)


def make_round_plan(
    *,
    federation: str,
    round_number: int,
    attempt: int,
    term: int,
    seed: bytes,
    participants: Sequence[str],
    dim: int,
    last_global_change: np.ndarray | None,
    compression: float,
    clip: float,
    max_weight: float,
    secure: bool,
    threshold: int = 0,
    error_feedback: bool = True,
    residual_decay: float = 1.0,
) -> RoundPlan:
    """compression 1 sends every coordinate; c > 1 sends ceil(dim / c) public ones.

    ``residual_decay`` < 1 bounds the error-feedback residual: at high compression a
    coordinate waits many rounds between sends, and a residual of all of them landing
    at once swings the model (simulations/bench_compression.py measures it)."""
    if not 0.0 < residual_decay <= 1.0:
        raise ValueError(f"residual_decay must be in (0, 1], got {residual_decay}")
    if compression <= 1:
        indices = np.arange(dim, dtype=np.int64)
    else:
        k = max(1, math.ceil(dim / compression))
        indices = public_index_set(dim, k, last_global_change, hashlib.sha256(b"index" + seed).digest())
    codec = secagg = None
    if secure:
        n = len(participants)
        codec = FixedPointCodec(clip=clip, n_clients=n, max_weight=1.0)
        degree = default_degree(n)
        secagg = SecAggParams(
            context=make_context(federation, round_number, attempt, term),
            participants=tuple(participants),
            vector_len=int(indices.size) + 1,
            threshold=threshold or default_threshold(degree),
            graph_seed=hashlib.sha256(b"graph" + seed).digest(),
            degree=degree,
        )
    return RoundPlan(dim, indices, float(clip), float(max_weight), error_feedback, codec, secagg,
                     float(residual_decay))


@dataclass(frozen=True)
class SiteUpdate:
    """What leaves the site's pipeline: values on the index set and their weight."""

    values: np.ndarray
    weight: float
    residual: np.ndarray | None


def sparsify_update(delta: np.ndarray, residual: np.ndarray | None, plan: RoundPlan,
                    num_examples: int) -> SiteUpdate:
    """error feedback -> projection onto the public index set -> per-coordinate clip.

    The clipped-off part and the unsent coordinates return to the residual (times the
    plan's ``residual_decay``). The weight
    is the example count capped at max_weight, scaled into (0, 1].
    """
    corrected = delta.astype(np.float64)
    if plan.error_feedback and residual is not None:
        corrected = apply_error_feedback(corrected, residual)
    clipped, _ = clip_values(project(corrected, plan.indices), plan.clip)
    res = None
    if plan.error_feedback:
        res = new_residual(corrected, plan.indices, clipped)
        if plan.residual_decay != 1.0:
            res *= plan.residual_decay
    weight = min(float(num_examples), plan.max_weight) / plan.max_weight
    return SiteUpdate(values=clipped, weight=weight, residual=res)


def encode_update(update: SiteUpdate, plan: RoundPlan, rng: np.random.Generator) -> np.ndarray:
    """Fixed point in Z_2^32, weight-scaled values with the weight appended (masked too)."""
    if plan.codec is None:
        raise ValueError("this round has no secure aggregation: nothing to encode")
    return plan.codec.encode(update.values * update.weight, update.weight, rng)
