"""A round's public plan, and the site's privacy pipeline as one pure call.

The leader and each site compute the same plan from the `round_open` record (round,
attempt, term, seed, participants, configuration) and the public model history (the
last global change), so the index set, the encoding and the SecAgg+ parameters are
agreed without another message and depend on no site's data. `plan_round` is the one
mapping from a round configuration to a plan, used by both.

`privatize` is DESIGN's step 4 after DP-SGD, stage by stage: update minus base -> plus
the error-feedback residual -> projection onto the public index set -> per-coordinate
clip -> fixed-point encoding with the weight appended. Like etcd's `Ready`, it returns
what to persist (the new residual) and what to send, and the site persists before it
sends; masking is the SecAgg+ client's.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


PLAN_KEYS = ("compression", "clip", "max_examples", "secure_aggregation", "threshold",
             "error_feedback", "residual_decay")
"""The round configuration keys that shape a plan."""


def plan_round(*, federation: str, round_number: int, attempt: int, term: int, seed_hex: str,
               participants: Sequence[str], dim: int, last_global_change: np.ndarray | None,
               config: Mapping[str, Any]) -> RoundPlan:
    """The public plan of a round from its configuration (``PLAN_KEYS``), exactly as the
    leader and every site derive it."""
    return make_round_plan(
        federation=federation, round_number=round_number, attempt=attempt, term=term,
        seed=bytes.fromhex(seed_hex), participants=participants, dim=dim,
        last_global_change=last_global_change, compression=config["compression"],
        clip=config["clip"], max_weight=config["max_examples"],
        secure=config["secure_aggregation"], threshold=config["threshold"],
        error_feedback=config["error_feedback"],
        residual_decay=config.get("residual_decay", 1.0))


@dataclass(frozen=True)
class Privatized:
    """What the site's pipeline produced for one round: persist `residual`, then send.

    `values` are the clipped float32 values on the index set (what a round without secure
    aggregation sends); `words` their fixed-point encoding with the weight appended, to be
    masked (None without secure aggregation)."""

    residual: np.ndarray | None
    values: np.ndarray
    words: np.ndarray | None
    weight: float
    num_examples: int


def privatize(trained: np.ndarray, base: np.ndarray, residual: np.ndarray | None,
              plan: RoundPlan, num_examples: int, rng: np.random.Generator) -> Privatized:
    """The site's update after local (DP-SGD) training, ready to persist and send.

    ``residual`` is the error-feedback residual persisted after the site's last round
    (None: none yet, or one of another length); ``rng`` draws the stochastic rounding."""
    delta = np.asarray(trained, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    if residual is not None and residual.shape != delta.shape:
        residual = None
    update = sparsify_update(delta, residual, plan, num_examples)
    words = encode_update(update, plan, rng) if plan.codec is not None else None
    return Privatized(residual=update.residual, values=update.values.astype(np.float32),
                      words=words, weight=update.weight, num_examples=int(num_examples))

