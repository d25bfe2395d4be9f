"""DP-SGD trainer: its ledger matches Opacus, survives restarts, refuses past the budget;
client-level clipping and noise do what they claim."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from client.dp.client_level import ClientLevelDP
from client.dp.ledger import BudgetExceeded, DPStateError
from client.dp.record_level import DPTorchTrainer
from client.training.tasks import get_parameters, make_trainer
from privacy.accounting import DPStep, epsilon_spent

DELTA = 1e-5
DP_KEYS = {
    "dp_noise_multiplier", "dp_sample_rate", "dp_steps", "dp_clip_norm", "dp_delta",
    "dp_epsilon", "dp_epsilon_total",
}

pytestmark = pytest.mark.filterwarnings(
    "ignore:Secure RNG turned off", "ignore:Full backward hook is firing"
)


def _trainer(state: Path, epsilon: float = 4.0, rounds: int = 3, seed: int | None = 7,
             **kw: object) -> DPTorchTrainer:
    task = make_trainer("breast_cancer", site_index=0, num_sites=5, seed=0, device="cpu")
    kw.setdefault("local_epochs", 1)  # the plan matches the rounds run below
    return DPTorchTrainer(task, epsilon, DELTA, rounds, state, seed=seed, **kw)  # type: ignore[arg-type]


def _fit(trainer: DPTorchTrainer, params: dict[str, np.ndarray], r: int) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer.fit(params, {"round": r, "lr": 0.5, "local_epochs": 1}).params


def test_ledger_epsilon_equals_opacus_after_several_fits(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path / "dp.json", sample_rate=0.25)
    params = trainer.initial_parameters()
    charges = []
    for r in range(3):
        result = trainer.fit(params, {"round": r, "lr": 0.5, "local_epochs": 1})
        assert DP_KEYS <= result.metrics.keys()
        assert result.metrics["dp_steps"] == 4.0 and result.metrics["dp_sample_rate"] == 0.25
        assert set(result.params) == set(params)  # plain names, no "_module." prefix
        assert any(not np.array_equal(result.params[k], params[k]) for k in params)
        charges.append(result.metrics["dp_epsilon"])
        params = result.params
    ledger = epsilon_spent(trainer.history, DELTA)
    assert len(trainer.history) == 3
    assert ledger == pytest.approx(trainer.privacy_engine.get_epsilon(DELTA), rel=1e-3)
    assert ledger == result.metrics["dp_epsilon_total"]
    assert sum(charges) == pytest.approx(ledger, rel=1e-9)
    assert ledger <= 4.0
    on_disk = json.loads((tmp_path / "dp.json").read_text())
    assert [DPStep.from_dict(d) for d in on_disk["history"]] == list(trainer.history)
    assert [p.name for p in tmp_path.iterdir()] == ["dp.json"]  # no temp files left


def test_restarted_trainer_continues_the_same_accounting(tmp_path: Path) -> None:
    state = tmp_path / "dp.json"
    first = _trainer(state)
    params = _fit(first, first.initial_parameters(), 0)
    params = _fit(first, params, 1)
    spent = first.epsilon_spent

    again = _trainer(state)  # a new process would do exactly this
    assert again.history == first.history
    assert again.noise_multiplier == first.noise_multiplier
    assert again.epsilon_spent == spent
    assert again.privacy_engine.get_epsilon(DELTA) == pytest.approx(spent, rel=1e-3)
    _fit(again, params, 2)
    assert len(again.history) == 3
    assert again.epsilon_spent > spent
    assert again.epsilon_spent == pytest.approx(again.privacy_engine.get_epsilon(DELTA), rel=1e-3)


def test_site_at_its_budget_refuses_without_training(tmp_path: Path) -> None:
    state = tmp_path / "dp.json"
    trainer = _trainer(state, epsilon=2.0, rounds=2)
    params = trainer.initial_parameters()
    for r in range(2):  # the plan makes exactly two rounds fit
        params = _fit(trainer, params, r)
    assert trainer.epsilon_spent <= 2.0
    before_file = state.read_bytes()
    before_model = get_parameters(trainer._task.model)
    preview = trainer.preview_charge({"local_epochs": 1})
    assert preview.step.steps == trainer.history[-1].steps and preview.epsilon > 0

    with pytest.raises(BudgetExceeded, match="exceeded") as info:
        trainer.fit(trainer.initial_parameters(), {"round": 2, "lr": 0.5, "local_epochs": 1})
    assert info.value.charge == pytest.approx(preview.epsilon, rel=1e-9)
    assert info.value.budget == 2.0 and info.value.spent == trainer.epsilon_spent
    assert str(round(info.value.spent, 4)) in str(info.value)
    assert state.read_bytes() == before_file
    after_model = get_parameters(trainer._task.model)
    assert all(np.array_equal(before_model[k], after_model[k]) for k in before_model)
    assert len(trainer.history) == 2


def test_sites_with_different_seeds_draw_different_noise(tmp_path: Path) -> None:
    """Seeded simulation trainers must not share noise (it would not average out)."""
    a = _trainer(tmp_path / "a.json", seed=1)
    b = _trainer(tmp_path / "b.json", seed=2)
    start = a.initial_parameters()
    pa, pb = _fit(a, start, 0), _fit(b, start, 0)
    assert not np.array_equal(pa["net.0.weight"], pb["net.0.weight"])
    c = _trainer(tmp_path / "c.json", seed=1)
    assert np.array_equal(_fit(c, start, 0)["net.0.weight"], pa["net.0.weight"])


def test_unreadable_state_is_an_error_not_a_reset(tmp_path: Path) -> None:
    state = tmp_path / "dp.json"
    state.write_text("{not json")
    with pytest.raises(DPStateError, match="Refusing to start"):
        _trainer(state)


def test_batchnorm_model_is_rejected(tmp_path: Path) -> None:
    task = make_trainer("breast_cancer", site_index=0, num_sites=5, seed=0, device="cpu")
    task.model = torch.nn.Sequential(torch.nn.Linear(30, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match="BatchNorm"):
        DPTorchTrainer(task, 3.0, DELTA, 2, tmp_path / "dp.json")


def test_sample_rate_must_be_one_over_an_integer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="1/k"):
        _trainer(tmp_path / "dp.json", sample_rate=0.3)


def test_client_level_dp_clips_to_the_norm() -> None:
    rng = np.random.default_rng(0)
    no_noise = ClientLevelDP(clip_norm=1.5, noise_multiplier=0.0, rng=rng)
    big = rng.normal(size=1000) * 10
    out = no_noise(big)
    assert np.linalg.norm(out) == pytest.approx(1.5, rel=1e-6)
    assert np.allclose(out / np.linalg.norm(out), big / np.linalg.norm(big), atol=1e-6)
    small = np.full(4, 0.1)
    assert np.allclose(no_noise(small), small)
    noisy = ClientLevelDP(clip_norm=1.5, noise_multiplier=1.0, rng=rng)
    assert noisy.step() == DPStep(1.0, 1.0, 1, 1.5)


def test_client_level_dp_noise_has_the_stated_std() -> None:
    dp = ClientLevelDP(clip_norm=0.5, noise_multiplier=2.0, rng=np.random.default_rng(1234))
    n = 200_000
    noise = dp(np.zeros(n))
    # Sample std of n normals has relative standard error 1/sqrt(2n) ~ 0.0016.
    assert float(noise.std()) == pytest.approx(1.0, rel=0.01)
    assert abs(float(noise.mean())) < 5 / np.sqrt(n)


def test_client_level_dp_over_parameter_dicts() -> None:
    base = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(3, np.float32)}
    trained = {"w": np.full((3, 4), 2.0, np.float32), "b": np.full(3, 2.0, np.float32)}
    dp = ClientLevelDP(clip_norm=1.0, noise_multiplier=0.0, rng=np.random.default_rng(0))
    out = dp.privatize_params(base, trained)
    assert {k: v.shape for k, v in out.items()} == {"w": (3, 4), "b": (3,)}
    total = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in out.values()))
    assert total == pytest.approx(1.0, rel=1e-6)


def test_empty_poisson_batches_are_steps_too(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path / "dp.json", epsilon=8.0, rounds=2, sample_rate=1 / 50)
    assert any(len(batch) == 0 for batch in trainer._sampler)
    result = trainer.fit(trainer.initial_parameters(), {"round": 0, "lr": 0.1})
    assert result.metrics["dp_steps"] == 50.0
    assert all(np.isfinite(v).all() for v in result.params.values())
    assert trainer.epsilon_spent == pytest.approx(trainer.privacy_engine.get_epsilon(DELTA), rel=1e-3)
