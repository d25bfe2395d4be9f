"""Client-level DP around a trainer the agent cannot instrument (a hosted Flower app):
budget refusals, ledger, restarts, clipping and the client-level label."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.config import PrivacyConfig, SiteConfig, SiteConfigError
from client.dp.client_level import CLIENT_LEVEL_METRIC, ClientLevelDPTrainer
from client.dp.ledger import BudgetExceeded, DPStateError
from client.training import EvalResult, FitResult, Parameters
from privacy.accounting import DPStep, epsilon_spent

DELTA = 1e-5
DP_KEYS = {
    "dp_noise_multiplier", "dp_sample_rate", "dp_steps", "dp_clip_norm", "dp_delta",
    "dp_epsilon", "dp_epsilon_total", CLIENT_LEVEL_METRIC,
}
FLOWER_APP = "client.examples.flower_breast_cancer:app"
BASE: Parameters = {"w": np.ones((4, 5), np.float32), "b": np.full(5, -0.5, np.float32)}


class FakeTrainer:
    """Moves every weight by ``step``; stands in where the Flower app would be slow."""

    def __init__(self, step: float = 3.0, fail: bool = False) -> None:
        self.step = step
        self.fail = fail
        self.fits = 0

    def initial_parameters(self) -> Parameters:
        return {k: v.copy() for k, v in BASE.items()}

    def fit(self, params: Parameters, config: Mapping[str, Any]) -> FitResult:
        self.fits += 1
        if self.fail:
            raise RuntimeError("app crashed")
        trained = {k: (v + self.step).astype(np.float32) for k, v in params.items()}
        # an app reporting its own dp_* numbers must not pass for this release's
        return FitResult(trained, 17, {"train_loss": 0.25, "dp_epsilon": 99.0})

    def evaluate(self, params: Parameters, config: Mapping[str, Any]) -> EvalResult:
        return EvalResult(0.5, 3, {"accuracy": 0.75})


class NoNoise:
    """A generator that draws zeros: isolates the clipping."""

    def normal(self, loc: float, scale: float, size: tuple[int, ...]) -> np.ndarray:
        return np.zeros(size)


def _change_norm(base: Parameters, out: Parameters) -> float:
    return float(
        np.sqrt(sum(np.sum((out[k].astype(np.float64) - base[k].astype(np.float64)) ** 2) for k in base))
    )


def _wrapper(state: Path, inner: Any = None, epsilon: float = 8.0, rounds: int = 2,
             **kw: Any) -> ClientLevelDPTrainer:
    return ClientLevelDPTrainer(inner or FakeTrainer(), epsilon, DELTA, rounds, state, **kw)


def test_refuses_past_its_budget_without_training(tmp_path: Path) -> None:
    state = tmp_path / "dp.json"
    inner = FakeTrainer()
    dp = _wrapper(state, inner, epsilon=8.0, rounds=2)
    for r in range(2):  # the plan makes exactly two rounds fit
        dp.fit(BASE, {"round": r})
    assert inner.fits == 2 and dp.epsilon_spent <= 8.0
    preview = dp.preview_charge({"round": 2, "local_epochs": 5})
    assert preview.step == DPStep(dp.noise_multiplier, 1.0, 1, 1.0) and preview.epsilon > 0
    assert dp.epsilon_spent + preview.epsilon > dp.epsilon_budget  # the agent declines too
    before = state.read_bytes()

    with pytest.raises(BudgetExceeded, match="exceeded") as info:
        dp.fit(BASE, {"round": 2})
    assert inner.fits == 2  # the app never ran
    assert info.value.charge == pytest.approx(preview.epsilon, rel=1e-9)
    assert info.value.spent == dp.epsilon_spent and info.value.budget == 8.0
    assert state.read_bytes() == before and len(dp.history) == 2


def test_ledger_is_the_accounted_history_and_metrics_say_client_level(tmp_path: Path) -> None:
    state = tmp_path / "dp.json"
    dp = _wrapper(state, epsilon=20.0, rounds=3)
    charges = []
    for r in range(3):
        result = dp.fit(BASE, {"round": r})
        m = result.metrics
        assert DP_KEYS <= m.keys() and m[CLIENT_LEVEL_METRIC] == 1.0
        assert all(isinstance(v, float) for v in m.values())  # the wire carries numbers
        assert (m["dp_sample_rate"], m["dp_steps"], m["dp_clip_norm"]) == (1.0, 1.0, 1.0)
        assert m["dp_noise_multiplier"] == dp.noise_multiplier and m["dp_delta"] == DELTA
        assert m["train_loss"] == 0.25 and m["dp_epsilon"] != 99.0
        assert result.num_examples == 17
        charges.append(m["dp_epsilon"])
    assert dp.history == (DPStep(dp.noise_multiplier, 1.0, 1, 1.0),) * 3
    assert dp.epsilon_spent == epsilon_spent(dp.history, DELTA) == m["dp_epsilon_total"]
    assert sum(charges) == pytest.approx(dp.epsilon_spent, rel=1e-9)
    assert dp.epsilon_spent <= 20.0 and dp.level == "client"
    on_disk = json.loads(state.read_text())
    assert [DPStep.from_dict(d) for d in on_disk["history"]] == list(dp.history)
    assert on_disk["level"] == "client" and on_disk["plan"]["mechanism"] == "client-level"
    assert [p.name for p in tmp_path.iterdir()] == ["dp.json"]  # no temp files left


def test_restarted_wrapper_continues_the_history(tmp_path: Path) -> None:
    state = tmp_path / "dp.json"
    first = _wrapper(state, epsilon=20.0, rounds=3)
    first.fit(BASE, {"round": 0})
    first.fit(BASE, {"round": 1})

    again = _wrapper(state, epsilon=20.0, rounds=3)  # a new process would do exactly this
    assert again.history == first.history
    assert again.noise_multiplier == first.noise_multiplier
    assert again.epsilon_spent == first.epsilon_spent
    again.fit(BASE, {"round": 2})
    assert len(again.history) == 3 and again.epsilon_spent > first.epsilon_spent
    with pytest.raises(BudgetExceeded):
        again.fit(BASE, {"round": 3})

    # a new plan keeps what was spent and re-plans sigma over what is left
    bigger = _wrapper(state, epsilon=30.0, rounds=4)
    assert bigger.history == again.history
    assert epsilon_spent([*bigger.history, bigger.preview_charge({}).step], DELTA) <= 30.0


def test_inner_failure_takes_the_charge_back(tmp_path: Path) -> None:
    state = tmp_path / "dp.json"
    inner = FakeTrainer(fail=True)
    dp = _wrapper(state, inner)
    before = state.read_bytes()
    with pytest.raises(RuntimeError, match="app crashed"):
        dp.fit(BASE, {"round": 0})
    assert inner.fits == 1 and dp.history == () and state.read_bytes() == before


def test_update_is_clipped_exactly_without_noise(tmp_path: Path) -> None:
    dp = _wrapper(tmp_path / "dp.json", FakeTrainer(step=3.0), clip_norm=1.5, rng=NoNoise())
    out = dp.fit(BASE, {"round": 0}).params
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: (v.shape, v.dtype) for k, v in BASE.items()}
    assert _change_norm(BASE, out) == pytest.approx(1.5, rel=1e-5)
    direction = out["w"].astype(np.float64) - 1.0
    assert np.allclose(direction, direction.flat[0])  # same direction as the update
    small = _wrapper(tmp_path / "small.json", FakeTrainer(step=0.01), clip_norm=1.5, rng=NoNoise())
    kept = small.fit(BASE, {"round": 0}).params
    assert all(np.allclose(kept[k], BASE[k] + 0.01, atol=1e-6) for k in BASE)  # under the clip: unchanged


def test_noisy_update_stays_within_clip_plus_noise_bound(tmp_path: Path) -> None:
    dp = _wrapper(tmp_path / "dp.json", FakeTrainer(step=3.0), clip_norm=0.5)
    d = sum(v.size for v in BASE.values())
    # ||N(0, s^2 I_d)|| <= s (sqrt(d) + t) except with probability exp(-t^2 / 2)
    bound = 0.5 + dp.noise_multiplier * 0.5 * (np.sqrt(d) + 8.0)
    a = dp.fit(BASE, {"round": 0}).params
    b = dp.fit(BASE, {"round": 0}).params  # a retried round still draws fresh noise
    assert _change_norm(BASE, a) <= bound and _change_norm(BASE, b) <= bound
    assert not np.array_equal(a["w"], b["w"])
    assert abs(_change_norm(BASE, a) - 0.5) > 1e-3  # noise was added


def test_unreadable_state_is_an_error_not_a_reset(tmp_path: Path) -> None:
    state = tmp_path / "dp.json"
    state.write_text("[1, 2]")
    with pytest.raises(DPStateError, match="Refusing to start"):
        _wrapper(state)


def test_hosted_flower_app_releases_client_level_updates(tmp_path: Path) -> None:
    from client.training.flower_host import FlowerAppTrainer

    # constructed as tests/client/test_flower_host.py does
    app = FlowerAppTrainer(FLOWER_APP, run_config={}, node_config={"partition-id": 0, "num-partitions": 5})
    state = tmp_path / "dp.json"
    dp = ClientLevelDPTrainer(app, 30.0, DELTA, 2, state, clip_norm=0.5)
    base = dp.initial_parameters()
    assert list(base) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    d = sum(v.size for v in base.values())
    bound = 0.5 + dp.noise_multiplier * 0.5 * (np.sqrt(d) + 8.0)
    for r in range(2):
        result = dp.fit(base, {"round": r, "lr": 0.05, "local_epochs": 1})
        assert {k: v.shape for k, v in result.params.items()} == {k: v.shape for k, v in base.items()}
        assert all(v.dtype == np.float32 for v in result.params.values())
        assert _change_norm(base, result.params) <= bound
        assert result.metrics[CLIENT_LEVEL_METRIC] == 1.0 and "train_loss" in result.metrics
        assert result.num_examples > 0
    assert app.calls == 1 + 2  # the initial-parameters query and two trains
    assert result.metrics["dp_epsilon_total"] == epsilon_spent(dp.history, DELTA) <= 30.0
    with pytest.raises(BudgetExceeded):
        dp.fit(base, {"round": 2})
    assert app.calls == 3
    assert dp.evaluate(base, {"round": 2}).num_examples > 0


def _flower_site(tmp_path: Path, privacy: dict[str, Any]) -> SiteConfig:
    """A Flower site whose [privacy] section is `privacy`, checked as site.toml's is."""
    return SiteConfig(site_id="s1", nodes=("localhost:1",), state_dir=tmp_path / "state",
                      identity_key=tmp_path / "id.pem", ca=tmp_path / "ca.pem",
                      cert=tmp_path / "c.pem", key=tmp_path / "c.key", task=None,
                      flower_app=FLOWER_APP, data={"partition": 1, "num_partitions": 3},
                      privacy=PrivacyConfig.from_section(privacy, flower_app=True))


def test_site_config_wraps_a_flower_app_in_client_level_dp(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from client.cli import _trainer_from_config
    from client.training.flower_host import FlowerAppTrainer

    with caplog.at_level(logging.INFO, logger="client.cli"):
        trainer = _trainer_from_config(
            _flower_site(tmp_path, {"epsilon": 30.0, "planned_rounds": 2, "clip_norm": 0.25})
        )
    assert isinstance(trainer, ClientLevelDPTrainer)
    assert isinstance(trainer.inner, FlowerAppTrainer)
    assert trainer.inner.context.node_config == {"partition-id": 1, "num-partitions": 3}
    assert (trainer.clip_norm, trainer.delta, trainer.epsilon_budget) == (0.25, 1e-5, 30.0)
    assert (tmp_path / "state" / "dp-accountant.json").exists()
    assert "CLIENT-LEVEL" in caplog.text and "not record-level" in caplog.text

    assert isinstance(_trainer_from_config(_flower_site(tmp_path, {})), FlowerAppTrainer)
    with pytest.raises(SiteConfigError, match="privacy.sample_rate"):
        _trainer_from_config(_flower_site(tmp_path, {"epsilon": 3.0, "sample_rate": 0.5}))
    with pytest.raises(SiteConfigError, match="privacy.epsilon"):
        _trainer_from_config(_flower_site(tmp_path, {"delta": 1e-6}))
