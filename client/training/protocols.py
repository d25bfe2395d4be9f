"""The seam between the site agent and whatever trains the model.

The agent speaks only in named float32 arrays (the same names and shapes as the
coordinator's safetensors blobs); a trainer turns them into a model, trains or
evaluates on local records, and hands arrays back. Built-in torch tasks and a hosted
Flower ClientApp both implement this protocol, so the agent never knows which it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from privacy.accounting import DPStep

Parameters = dict[str, np.ndarray]
"""Model weights by name, float32, in the order the model defines them."""


@dataclass(frozen=True)
class FitResult:
    params: Parameters
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class LocalTrainer(Protocol):
    """What the agent needs from local training code."""

    def initial_parameters(self) -> Parameters:
        """Fresh weights for version 0 of the global model."""
        ...

    def fit(self, params: Parameters, config: Mapping[str, Any]) -> FitResult:
        """Train from `params` on local records; `config` holds round, local_epochs, lr."""
        ...

    def evaluate(self, params: Parameters, config: Mapping[str, Any]) -> EvalResult:
        """Evaluate `params` on the site's held-out records; metrics include accuracy."""
        ...


class ChargePreview(NamedTuple):
    """What a round would cost: its mechanism and its epsilon charge."""

    step: DPStep
    epsilon: float


@runtime_checkable
class PrivateTrainer(LocalTrainer, Protocol):
    """A trainer that spends a privacy budget: the agent asks what a round would cost
    before it joins one, and declines a round the budget cannot pay.

    Its `fit` raises `client.dp.ledger.BudgetExceeded` (nothing trained) when the round
    would take the site past its budget."""

    epsilon_budget: float
    epsilon_spent: float

    def preview_charge(self, config: Mapping[str, Any]) -> ChargePreview:
        """The round's mechanism and epsilon charge for `config`, without training."""
        ...

