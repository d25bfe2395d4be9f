"""One round attempt on the site (client/round_work.py) and the agent's handling of tasks:
the update is privatized once and persisted before it is sent, a whole SecAgg+ session
through the stage bodies sums to the sites' weighted updates, budget refusals are told
by type, and a malformed task is skipped."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client import round_work
from client.agent import Agent, RoundOutcome
from client.dp.ledger import BudgetExceeded
from client.round_work import BudgetRefusal, RoundWork, Site
from client.store import DurableState
from client.training import ChargePreview, EvalResult, FitResult, Parameters, PrivateTrainer
from coordinator import wire
from privacy import secagg
from privacy.accounting import BUDGET_SLACK, DPStep

BASE: Parameters = {"b": np.zeros(2, np.float32), "w": np.ones((2, 2), np.float32)}
SEED = "5e" * 32


class ShiftTrainer:
    """Moves every weight by `step`, on 17 examples."""

    def __init__(self, step: float = 0.1, error: BaseException | None = None) -> None:
        self.step = step
        self.error = error
        self.fits = 0

    def initial_parameters(self) -> Parameters:
        return dict(BASE)

    def fit(self, params: Parameters, config: Mapping[str, Any]) -> FitResult:
        self.fits += 1
        if self.error is not None:
            raise self.error
        return FitResult({k: v + np.float32(self.step) for k, v in params.items()}, 17,
                         {"train_loss": 0.5})

    def evaluate(self, params: Parameters, config: Mapping[str, Any]) -> EvalResult:
        return EvalResult(0.25, 5, {"accuracy": 0.75})


class PrivateShift(ShiftTrainer):
    """A trainer with a privacy budget: `cost` a round, `spent` of `budget` so far."""

    def __init__(self, cost: float, spent: float = 0.9, budget: float = 1.0) -> None:
        super().__init__()
        self.cost = cost
        self.epsilon_spent = spent
        self.epsilon_budget = budget

    def preview_charge(self, config: Mapping[str, Any]) -> ChargePreview:
        return ChargePreview(DPStep(1.0, 0.1, 10, 1.0), self.cost)


def _task(stage: str = "collect", secure: bool = False, participants: tuple[str, ...] = ("s0",),
          **payload: Any) -> dict[str, Any]:
    config = {"local_epochs": 1, "lr": 0.1, "batch_size": 8, "secure_aggregation": secure,
              "compression": 1.0, "error_feedback": True, "clip": 1.0, "max_examples": 100,
              "threshold": 0, "residual_decay": 1.0}
    return {"federation": "fed", "round": 3, "attempt": 1, "term": 2,
            "base": wire.sha256_hex(wire.encode_model(BASE)), "parent": None, "seed": SEED,
            "participants": list(participants), "stage": stage, "deadline_s": 10.0,
            "config": config, "identity_keys": {}, **payload}


def _site(tmp_path: Path, trainer: Any, name: str = "s0",
          key: Ed25519PrivateKey | None = None) -> Site:
    state = tmp_path / name
    return Site(name, key or Ed25519PrivateKey.generate(), trainer, DurableState(state),
                state / "residual.npy")


def test_plain_round_privatizes_once_and_persists_before_it_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = round_work.privatize
    monkeypatch.setattr(round_work, "privatize", lambda *a: calls.append(1) or real(*a))
    site = _site(tmp_path, ShiftTrainer())
    task = wire.Task.from_wire(_task())
    work = RoundWork(site, task, BASE, None)
    body = work.answer(task)
    assert site.state.joined("3.1.2") and site.residual_path.exists()
    assert set(body) == {"round", "attempt", "term", "stage", "update", "num_examples", "metrics"}
    assert (body["round"], body["attempt"], body["term"], body["stage"]) == (3, 1, 2, "collect")
    assert body["num_examples"] == 17 and body["metrics"]["eval_accuracy"] == 0.75
    assert np.allclose(wire.decode_update(body["update"], 6), 0.1)
    assert wire.Submit.from_wire({"site": "s0", **body}).update == body["update"]
    assert work.answer(task) == body and len(calls) == 1  # resent, never privatized again
    assert DurableState(tmp_path / "s0").joined("3.1.2")


def test_secure_session_sums_the_sites_weighted_updates(tmp_path: Path) -> None:
    names = ("s0", "s1", "s2")
    keys = {n: Ed25519PrivateKey.generate() for n in names}
    ids = {n: wire.public_key_hex(k) for n, k in keys.items()}
    first = [wire.Task.from_wire(_task("advertise", True, names, identity_keys=ids))] * 3
    works = {n: RoundWork(_site(tmp_path, ShiftTrainer(0.1 * (i + 1)), n, keys[n]), first[i],
                          BASE, None) for i, n in enumerate(names)}
    plan = works["s0"].plan
    assert plan.secagg is not None and plan.codec is not None
    server = secagg.SecAggServer(plan.secagg, {n: bytes.fromhex(k) for n, k in ids.items()})

    def answer(name: str, stage: str, **payload: Any) -> dict[str, Any]:
        body = works[name].answer(wire.Task.from_wire(_task(stage, True, names, identity_keys=ids,
                                                            **payload)))
        assert wire.Submit.from_wire({"site": name, **body}).stage == stage
        return body["secagg"]

    for n in names:
        server.receive_advertisement(secagg.Advertisement.from_wire(answer(n, "advertise")), n)
    directories = server.close_advertise()
    for n in names:
        shares = answer(n, "share", directory=directories[n].to_wire())
        server.receive_shares(secagg.EncryptedShares.from_wire(shares), n)
    requests = server.close_share_keys()
    for n in names:
        masked = answer(n, "masked", request=requests[n].to_wire())
        assert works[n].site.state.joined("3.1.2")  # persisted before the body went out
        server.receive_masked_input(secagg.MaskedInput.from_wire(masked), n)
    unmask = server.close_masked_input()
    for n in names:
        response = answer(n, "unmask", request=unmask.to_wire())
        server.receive_unmask(secagg.UnmaskResponse.from_wire(response), n)
    values, weight = plan.codec.decode(server.finish().total)
    assert weight == pytest.approx(3 * 0.17, abs=1e-6)
    assert np.allclose(values, 0.17 * (0.1 + 0.2 + 0.3), atol=1e-4)


def test_a_stage_without_its_payload_leaves_the_session(tmp_path: Path) -> None:
    names = ("s0", "s1", "s2")
    ids = {n: wire.public_key_hex(Ed25519PrivateKey.generate()) for n in names}
    task = wire.Task.from_wire(_task("share", True, names, identity_keys=ids))
    work = RoundWork(_site(tmp_path, ShiftTrainer()), task, BASE, None)
    with pytest.raises(secagg.InvalidMessage):
        work.answer(task)
    with pytest.raises(secagg.StageError):  # a round without secure aggregation
        RoundWork(_site(tmp_path, ShiftTrainer(), "s9"), wire.Task.from_wire(_task()), BASE,
                  None).answer(wire.Task.from_wire(_task("share", directory={})))


def test_budget_exceeded_is_told_by_its_type(tmp_path: Path) -> None:
    task = wire.Task.from_wire(_task())
    refused = _site(tmp_path, ShiftTrainer(error=BudgetExceeded(1.0, 1.0, 0.5)))
    with pytest.raises(BudgetRefusal, match="privacy budget exceeded"):
        RoundWork(refused, task, BASE, None).answer(task)
    assert not refused.state.joined(task.session)

    class BudgetExceededLookalike(RuntimeError):
        pass

    BudgetExceededLookalike.__name__ = "BudgetExceeded"
    other = _site(tmp_path, ShiftTrainer(error=BudgetExceededLookalike("not the ledger's")), "s1")
    with pytest.raises(BudgetExceededLookalike):
        RoundWork(other, task, BASE, None).answer(task)
    assert not other.state.joined(task.session)


def test_a_private_trainer_declines_what_its_budget_cannot_pay(tmp_path: Path) -> None:
    task = wire.Task.from_wire(_task())
    assert isinstance(PrivateShift(0.1), PrivateTrainer)
    assert not isinstance(ShiftTrainer(), PrivateTrainer)
    at_the_edge = PrivateShift(0.1 + BUDGET_SLACK / 2)
    RoundWork(_site(tmp_path, at_the_edge), task, BASE, None).answer(task)
    assert at_the_edge.fits == 1
    over = PrivateShift(0.2)
    with pytest.raises(BudgetRefusal, match="the site declines"):
        RoundWork(_site(tmp_path, over, "s1"), task, BASE, None)
    assert over.fits == 0


class FakeNode:
    """Stands in for the leader behind `Agent._call`: one task, the base model, Submits."""

    def __init__(self, agent: Agent, task: dict[str, Any] | None) -> None:
        self.agent = agent
        self.task = task
        self.polls = 0
        self.submitted: list[dict[str, Any]] = []

    def __call__(self, method: str, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        if method == "GetBlob":
            return {"ok": True, "data": wire.encode_model(BASE)}
        if method == "Submit":
            self.submitted.append(message)
            return {"ok": True}
        self.polls += 1
        if self.polls > 3:
            self.agent.stopped.set()
        return {"ok": True, "status": "task", "task": self.task}


@pytest.mark.parametrize("task", [None, {"stage": "collect"}, _task(stage="bogus"),
                                  _task() | {"config": {"lr": 0.1}}])
def test_agent_skips_a_malformed_task(tmp_path: Path, task: dict[str, Any] | None) -> None:
    agent = Agent("s0", ["127.0.0.1:1"], (b"", b"", b""), Ed25519PrivateKey.generate(),
                  ShiftTrainer(), tmp_path / "state")
    agent.stopped.wait = lambda timeout=None: False  # type: ignore[method-assign]
    node = FakeNode(agent, task)
    agent._call = node  # type: ignore[method-assign]
    agent.run()
    assert node.polls == 4 and node.submitted == [] and agent._work is None


def test_agent_answers_a_task_once(tmp_path: Path) -> None:
    outcomes: list[RoundOutcome] = []
    agent = Agent("s0", ["127.0.0.1:1"], (b"", b"", b""), Ed25519PrivateKey.generate(),
                  ShiftTrainer(), tmp_path / "state", on_round=outcomes.append)
    agent.stopped.wait = lambda timeout=None: False  # type: ignore[method-assign]
    node = FakeNode(agent, _task())
    agent._call = node  # type: ignore[method-assign]
    agent.run()
    assert outcomes == [RoundOutcome(3, 1, True, "accepted")]
    assert len(node.submitted) == 1  # the same session polled again is not answered again
    sent = node.submitted[0]
    assert {k: sent[k] for k in ("round", "attempt", "term", "stage", "num_examples")} == {
        "round": 3, "attempt": 1, "term": 2, "stage": "collect", "num_examples": 17}


class SlowTrainer(ShiftTrainer):
    """Trains for `seconds` and records how many fits ever ran at once."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.running = 0
        self.most = 0
        self._count = threading.Lock()

    def fit(self, params: Parameters, config: Mapping[str, Any]) -> FitResult:
        with self._count:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.seconds)
            return super().fit(params, config)
        finally:
            with self._count:
                self.running -= 1


def test_training_that_outlives_its_deadline_never_runs_beside_the_next(tmp_path: Path) -> None:
    trainer = SlowTrainer(1.5)
    site = _site(tmp_path, trainer)
    late = wire.Task.from_wire({**_task(), "deadline_s": 0.0})  # waits 1 s, then gives up
    with pytest.raises(secagg.ProtocolAbort, match="did not finish"):
        RoundWork(site, late, BASE, None).answer(late)
    retry = wire.Task.from_wire({**_task(), "attempt": 2})
    body = RoundWork(site, retry, BASE, None).answer(retry)  # the site joins the next attempt
    assert body["attempt"] == 2 and site.state.joined("3.2.2")
    assert not site.state.joined("3.1.2")  # the abandoned attempt sent nothing
    assert trainer.fits == 2 and trainer.most == 1
