"""The seam between the site agent and whatever trains the model.

The agent speaks only in named float32 arrays (the same names and shapes as the
coordinator's safetensors blobs); a trainer turns them into a model, trains or
evaluates on local records, and hands arrays back. Built-in torch tasks and a hosted
Flower ClientApp both implement this protocol, so the agent never knows which it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

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
