"""The leader's aggregation path, as stages composed in order.

sum (plain now; the secure sum plugs in here) -> weighted mean -> server optimizer.
Pure numpy: no I/O, so it is testable on its own and cheap on the Raft thread's GIL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PlainSum:
    """Accumulates weight * update without keeping any single update around."""

    dim: int
    total: np.ndarray = field(init=False)
    weight: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.total = np.zeros(self.dim, dtype=np.float64)

    def add(self, update: np.ndarray, weight: float) -> None:
        if update.shape != (self.dim,):
            raise ValueError(f"update has shape {update.shape}, expected ({self.dim},)")
        if not weight > 0:
            raise ValueError("weight must be positive")
        self.total += weight * update.astype(np.float64)
        self.weight += weight
        self.count += 1

    def result(self) -> tuple[np.ndarray, float]:
        return self.total, self.weight


def weighted_mean(total: np.ndarray, weight: float) -> np.ndarray:
    if weight <= 0:
        raise ValueError("no weight to divide by")
    return total / weight


@dataclass(frozen=True)
class ServerSGD:
    """FedAvg's server step: new = base + lr * mean delta (lr 1.0 is plain FedAvg)."""

    lr: float = 1.0

    def __call__(self, base: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        return (base.astype(np.float64) + self.lr * mean_delta).astype(np.float32)


def aggregate(base: np.ndarray, acc: PlainSum, optimizer: ServerSGD) -> np.ndarray:
    total, weight = acc.result()
    return optimizer(base, weighted_mean(total, weight))
