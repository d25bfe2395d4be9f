"""This site's part in one round attempt, from its first task to its last stage.

Training runs in a background thread while the key stages (advertise, share) go on, so
a slow local fit does not hold up the session. The update goes through the site's
pipeline once (`privacy.plan.privatize`: DP-SGD already inside local training -> update
minus base -> plus the error-feedback residual -> projection onto the public index set ->
per-coordinate clip, the clipped part back into the residual -> fixed-point encoding with
the weight appended), and the site persists before it sends: the session is marked
joined and the new residual saved before the first stage body that carries the update
is returned. Then a restarted agent cannot feed a second update into the same session
(invariant 5), nor add the same residual twice. Secure rounds mask the encoded words;
plain rounds send the values in the clear.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.dp.ledger import BudgetExceeded
from client.store import DurableState, load_residual, save_residual
from client.training import FitResult, LocalTrainer, Parameters, PrivateTrainer
from coordinator import wire
from privacy import secagg
from privacy.accounting import within_budget
from privacy.plan import Privatized, RoundPlan, plan_round, privatize


class BudgetRefusal(Exception):
    """The site's own privacy budget cannot pay for this round; it does not take part."""


@dataclass(frozen=True)
class Site:
    """What a round attempt needs of the agent: who the site is, what trains, and where
    its durable state lives.

    `training` is held while a local training runs. An attempt the site leaves (its stage
    deadline passed) keeps training in its thread; the next attempt's training waits for
    it instead of running beside it on the same model, which trainers do not allow."""

    site_id: str
    key: Ed25519PrivateKey
    trainer: LocalTrainer
    state: DurableState
    residual_path: Path
    training: threading.Lock = field(default_factory=threading.Lock, compare=False)


class RoundWork:
    """One round attempt of this site, built from its first task (any stage).

    Raises BudgetRefusal when the site's trainer spends a privacy budget the round does
    not fit; nothing is trained then.
    """

    def __init__(self, site: Site, task: wire.Task, base: Parameters,
                 parent: Parameters | None) -> None:
        self.site = site
        self.key = task.session
        self.base = base
        self.base_vec = wire.flatten(base)
        change = None if parent is None else self.base_vec - wire.flatten(parent)
        self.plan: RoundPlan = plan_round(
            federation=task.federation, round_number=task.round, attempt=task.attempt,
            term=task.term, seed_hex=task.seed, participants=task.participants,
            dim=self.base_vec.size, last_global_change=change, config=task.config.to_wire())
        self.client: secagg.SecAggClient | None = None
        if self.plan.secagg is not None:
            keys = {s: bytes.fromhex(k) for s, k in task.identity_keys.items()}
            self.client = secagg.SecAggClient(self.plan.secagg, site.site_id, site.key, keys,
                                              os.urandom)
        self.config = task.config.training(task.round)
        self.session = {"round": task.round, "attempt": task.attempt, "term": task.term}
        self._check_budget()
        self._fit: FitResult | None = None
        self._error: BaseException | None = None
        self._metrics: dict[str, float] = {}
        self._result: Privatized | None = None
        self._done = threading.Event()
        threading.Thread(target=self._train, name=f"train-{self.key}", daemon=True).start()

    def _check_budget(self) -> None:
        """Decline, before training, a round the site's own budget cannot pay for."""
        trainer = self.site.trainer
        if not isinstance(trainer, PrivateTrainer):
            return
        cost = trainer.preview_charge(self.config)
        spent, budget = trainer.epsilon_spent, trainer.epsilon_budget
        if not within_budget(spent + cost.epsilon, budget):
            raise BudgetRefusal(f"this round costs epsilon {cost.epsilon:.3f}; spent "
                                f"{spent:.3f} of {budget:.3f}: the site declines")

    # ------------------------------------------------------------ training

    def _train(self) -> None:
        trainer = self.site.trainer
        try:
            with self.site.training:  # one local training at a time (see Site)
                t0 = time.monotonic()
                ev = trainer.evaluate(self.base, self.config)
                self._fit = trainer.fit(self.base, self.config)
            self._record_run(self._fit.metrics)
            self._metrics = {"eval_accuracy": float(ev.metrics.get("accuracy", 0.0)),
                             "eval_loss": float(ev.loss),
                             "train_seconds": round(time.monotonic() - t0, 3)}
            # DP parameters travel in the clear: the ledger needs them to charge the site
            self._metrics.update({k: float(v) for k, v in self._fit.metrics.items()
                                  if k == "train_loss" or k.startswith("dp_")})
            # the leader refuses a Submit whose metrics are out of range: say so here first
            wire.check_site_metrics(self._metrics)
        except BaseException as exc:  # surfaced to the stage that needs the result
            self._error = exc
        finally:
            self._done.set()

    def _record_run(self, metrics: dict[str, float]) -> None:
        """The DP run just charged by the site's accountant, unsettled until the leader
        confirms a ledger charge for it (its update may die with the leader)."""
        if all(f"dp_{k}" in metrics for k in wire.UNSETTLED_DP):
            self.site.state.add_unsettled(
                self.session | {k: float(metrics[f"dp_{k}"]) for k in wire.UNSETTLED_DP})

    def _privatized(self, timeout: float) -> tuple[Privatized, dict[str, float]]:
        """The update, privatized once for this session and persisted before it is sent."""
        if self._result is None:
            if not self._done.wait(timeout):
                raise secagg.ProtocolAbort("local training did not finish before the deadline")
            if isinstance(self._error, BudgetExceeded):
                raise BudgetRefusal(str(self._error))
            if self._error is not None:
                raise self._error
            assert self._fit is not None
            residual = load_residual(self.site.residual_path, self.plan.dim)
            rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
            result = privatize(wire.flatten(self._fit.params), self.base_vec, residual, self.plan,
                               self._fit.num_examples, rng)
            # Invariant 5: this update is fed to this session and no other.
            self.site.state.mark_joined(self.key)
            save_residual(self.site.residual_path, result.residual)
            self._result = result
        return self._result, dict(self._metrics)

    # ------------------------------------------------------------ stages

    def _body(self, stage: str, **fields: Any) -> dict[str, Any]:
        """A stage's Submit body (the agent adds `site`, the signature and unsettled runs)."""
        return wire.Submit(site=self.site.site_id, stage=stage, **self.session, **fields).to_wire()

    def answer(self, task: wire.Task) -> dict[str, Any]:
        """This site's body for the task's stage. SecAgg+ errors mean the site leaves the
        session; BudgetRefusal that it declines the round."""
        stage = task.stage
        wait = max(1.0, task.deadline_s - 0.5)
        if stage == "collect":
            update, metrics = self._privatized(wait)
            return self._body(stage, update=wire.encode_update(update.values),
                              num_examples=update.num_examples, metrics=metrics)
        if self.client is None:
            raise secagg.StageError(f"stage {stage!r} in a round without secure aggregation")
        if stage == "advertise":
            return self._body(stage, secagg=self.client.advertise().to_wire())
        if stage == "share":
            directory = secagg.KeyDirectory.from_wire(task.payload.get("directory"))
            return self._body(stage, secagg=self.client.share_keys(directory).to_wire())
        if stage == "masked":
            request = secagg.MaskedInputRequest.from_wire(task.payload.get("request"))
            update, metrics = self._privatized(wait)
            assert update.words is not None  # a plan with secure aggregation encodes
            return self._body(stage, secagg=self.client.masked_input(request, update.words).to_wire(),
                              metrics=metrics)
        if stage == "unmask":
            request = secagg.UnmaskRequest.from_wire(task.payload.get("request"))
            return self._body(stage, secagg=self.client.unmask(request).to_wire())
        raise secagg.StageError(f"unknown stage {stage!r}")


def final_evaluation(site: Site, task: wire.Task, base: Parameters) -> dict[str, Any]:
    """The Submit body of a run's final evaluation: how `base`, the run's last model, does
    on the site's own held-out records. Nothing trains and nothing is charged."""
    with site.training:
        ev = site.trainer.evaluate(base, task.config.training(task.round))
    metrics = wire.check_site_metrics({"eval_accuracy": float(ev.metrics.get("accuracy", 0.0)),
                                       "eval_loss": float(ev.loss)})
    return wire.Submit(site=site.site_id, round=task.round, attempt=task.attempt,
                       term=task.term, stage=task.stage, metrics=metrics).to_wire()
