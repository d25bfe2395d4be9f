"""The final evaluation of a run: its last model, sent to the online sites, which report
how it does on their own held-out records.

Nothing trains and nothing is charged: a site evaluates a model every round anyway
(`eval_accuracy` of the base it received), and this is that report for the model no
round received. The leader alone holds the session; a new leader starts it again.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from coordinator import wire
from coordinator.core.round_config import RoundConfig, site_config
from coordinator.round.policy import site_means

EVAL_METRICS = ("eval_accuracy", "eval_loss")
"""What a site reports of the final model (the names of its per-round evaluation)."""


@dataclass
class EvalSession:
    """One run's final evaluation, open on the leader until every site answered or the
    deadline passed."""

    run: str
    version: str
    round: int  # the round that committed `version`
    term: int
    participants: frozenset[str]
    config: RoundConfig
    federation: str
    deadline: float
    reported: dict[str, dict[str, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def key(self) -> tuple[int, int, int]:
        """Attempt 0 of the version's round: no round attempt is ever numbered 0."""
        return (self.round, 0, self.term)

    def task(self, site: str) -> wire.Task | None:
        """The evaluate task for a participant that has not answered, before the deadline."""
        left = self.deadline - time.monotonic()
        if site not in self.participants or site in self.reported or left <= 0:
            return None
        return wire.Task(
            federation=self.federation, round=self.round, attempt=0, term=self.term,
            base=self.version, parent=None, seed="00",
            participants=tuple(sorted(self.participants)), stage=wire.EVAL_STAGE,
            deadline_s=left, config=site_config(self.config))

    def accept(self, submit: wire.Submit) -> dict[str, Any]:
        """Keep a participant's evaluation, once; say why not otherwise."""
        if submit.session != self.key:
            return wire.error("stale_round", "that evaluation is not open")
        if submit.site not in self.participants:
            return wire.error("not_participant", f"site {submit.site!r} was not asked")
        metrics = {k: submit.metrics[k] for k in EVAL_METRICS if k in submit.metrics}
        if not metrics:
            return wire.error("malformed", "an evaluation reports eval_accuracy or eval_loss")
        with self.lock:
            if submit.site in self.reported:
                return wire.error("duplicate", "this site already reported")
            if time.monotonic() > self.deadline:
                return wire.error("too_late", "the evaluation has closed")
            self.reported[submit.site] = metrics
        return {"ok": True}

    def done(self) -> bool:
        return len(self.reported) >= len(self.participants) or time.monotonic() > self.deadline


def mean_metrics(reported: dict[str, dict[str, float]]) -> dict[str, float]:
    """The sites' evaluation averaged without weights, and how many sites reported."""
    return {"sites": float(len(reported)), **site_means(reported.values(), EVAL_METRICS)}
