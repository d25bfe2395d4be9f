"""What the leader alone knows about the round attempt it opened.

A session dies with its leadership: a new leader aborts the attempt and runs the round
again, so nothing here is ever trusted across a leader change.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from coordinator import wire
from coordinator.core.round_config import RoundConfig, site_config
from coordinator.round import policy
from coordinator.round.aggregation import Aggregation


@dataclass
class RoundSession:
    round: int
    attempt: int
    term: int
    base: str
    parent: str | None
    seed: str
    base_params: dict[str, np.ndarray]  # the base model's tensors: names and shapes
    base_vector: np.ndarray
    participants: frozenset[str]
    config: RoundConfig
    lr: float  # this round's scheduled local learning rate
    agg: Aggregation
    opened_at: float
    identity_keys: dict[str, str] = field(default_factory=dict)
    federation: str = ""
    stage_deadline: float = 0.0
    stage_opened: float = 0.0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    declined: dict[str, str] = field(default_factory=dict)  # site -> why it takes no part
    charge_futures: dict[str, Future] = field(default_factory=dict)
    phase: str = "collect"  # the sum's stage, then aggregate/replicate/commit
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.round, self.attempt, self.term)

    @cached_property
    def roster(self) -> tuple[str, ...]:
        """The participants in order, sorted once: every task of every stage carries them."""
        return tuple(sorted(self.participants))

    def keys_for(self, site: str) -> dict[str, str]:
        """The identity keys a site needs: its SecAgg+ neighbours' (whose advertisements it
        verifies) and its own; none without secure aggregation. All of them would make
        every task grow with the round (64 KB each at 1,000 sites)."""
        secagg = self.agg.plan.secagg
        if secagg is None:
            return {}
        keys = self.identity_keys  # O(degree), not O(participants): built once per task
        return {k: keys[k] for k in (*secagg.neighbours[site], site) if k in keys}

    def task(self, site: str) -> wire.Task:
        """The current stage's task for one expected site."""
        return wire.Task(
            federation=self.federation, round=self.round, attempt=self.attempt,
            term=self.term, base=self.base, parent=self.parent, seed=self.seed,
            participants=self.roster, stage=self.agg.sum.stage,
            deadline_s=max(0.0, self.stage_deadline - time.monotonic()),
            config=site_config(self.config, self.lr), identity_keys=self.keys_for(site),
            payload=self.agg.sum.payload_for(site),
        )

    def open_stage(self) -> None:
        """Start the sum's current stage: its deadline runs from now."""
        self.stage_opened = time.monotonic()
        self.stage_deadline = self.stage_opened + policy.stage_timeout(self.agg.sum.stage,
                                                                       self.config)
        self.phase = self.agg.sum.stage

    def progress(self) -> dict[str, object]:
        """What `RoundStatus` shows of the open attempt."""
        summed = self.agg.sum
        return {"round": self.round, "attempt": self.attempt, "stage": self.phase,
                "participants": sorted(self.participants), "submitted": sorted(summed.answered),
                "expected": sorted(summed.expected()),
                "seconds": round(time.monotonic() - self.opened_at, 2)}
