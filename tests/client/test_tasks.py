"""Built-in torch tasks: determinism, the LocalTrainer contract, and FedAvg that learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.training import FitResult, LocalTrainer, Parameters
from client.training.tasks import (
    TASK_DEFAULTS,
    TASKS,
    TorchTaskTrainer,
    build_model,
    evaluate_global,
    get_parameters,
    make_trainer,
    set_parameters,
)


def fedavg(results: list[FitResult]) -> Parameters:
    """Weighted average of the sites' parameters, weights = num_examples."""
    total = sum(r.num_examples for r in results)
    return {
        name: (sum(r.params[name].astype(np.float64) * r.num_examples for r in results) / total).astype(
            np.float32
        )
        for name in results[0].params
    }


def run_fedavg(
    task: str, method: str, alpha: float, seed: int, rounds: int = 10, sites: int = 5
) -> list[float]:
    trainers = [
        make_trainer(task, site_index=i, num_sites=sites, method=method, alpha=alpha, seed=seed, device="cpu")
        for i in range(sites)
    ]
    params = trainers[0].initial_parameters()
    accuracy = []
    for r in range(rounds):
        params = fedavg([t.fit(params, {"round": r}) for t in trainers])
        accuracy.append(evaluate_global(task, params))
    return accuracy


def test_tasks_registry() -> None:
    assert TASKS == ("breast_cancer", "digits", "digits_small", "mnist")
    assert set(TASK_DEFAULTS) == set(TASKS)
    with pytest.raises(ValueError, match="unknown task"):
        make_trainer("cifar10")


@pytest.mark.parametrize("task", TASKS)
def test_models_have_no_batchnorm(task: str) -> None:
    model = build_model(task)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(not name.endswith("running_mean") for name in model.state_dict())


@pytest.mark.parametrize(("task", "sites"), [("breast_cancer", 2), ("digits", 3), ("mnist", 5)])
def test_fit_lowers_loss_and_keeps_the_contract(task: str, sites: int) -> None:
    trainer: LocalTrainer = make_trainer(task, site_index=0, num_sites=sites, seed=0, device="cpu")
    assert isinstance(trainer, TorchTaskTrainer)
    params = trainer.initial_parameters()
    names = list(build_model(task).state_dict())
    assert list(params) == names
    assert all(v.dtype == np.float32 for v in params.values())

    before = trainer.evaluate_train(params).loss
    result = trainer.fit(params, {"round": 0})
    after = trainer.evaluate_train(result.params).loss
    assert after < 0.75 * before, (before, after)

    assert list(result.params) == names
    assert all(result.params[k].shape == params[k].shape for k in names)
    assert all(result.params[k].dtype == np.float32 for k in names)
    assert result.num_examples == trainer.site.num_train
    assert np.isfinite(result.metrics["train_loss"])
    # the input is not modified in place
    assert np.array_equal(params[names[0]], trainer.initial_parameters()[names[0]])

    ev = trainer.evaluate(result.params, {})
    assert ev.num_examples == trainer.site.num_test
    assert 0.0 <= ev.metrics["accuracy"] <= 1.0 and np.isfinite(ev.loss)


def test_training_is_deterministic_given_seed() -> None:
    a = make_trainer("digits", site_index=1, num_sites=5, seed=3, device="cpu")
    b = make_trainer("digits", site_index=1, num_sites=5, seed=3, device="cpu")
    c = make_trainer("digits", site_index=1, num_sites=5, seed=4, device="cpu")
    pa, pb = a.initial_parameters(), b.initial_parameters()
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert not all(np.array_equal(pa[k], c.initial_parameters()[k]) for k in pa)
    ra, rb = a.fit(pa, {"round": 2}), b.fit(pb, {"round": 2})
    assert all(np.array_equal(ra.params[k], rb.params[k]) for k in pa)
    # same trainer, same inputs, same round: same output; another round shuffles differently
    assert all(np.array_equal(a.fit(pa, {"round": 2}).params[k], ra.params[k]) for k in pa)
    other = a.fit(pa, {"round": 5}).params
    assert not all(np.array_equal(other[k], ra.params[k]) for k in pa)


def test_config_overrides_defaults() -> None:
    trainer = make_trainer("breast_cancer", site_index=0, num_sites=5, device="cpu")
    params = trainer.initial_parameters()
    none = trainer.fit(params, {"round": 0, "local_epochs": 0})
    assert all(np.array_equal(none.params[k], params[k]) for k in params)
    adam = trainer.fit(params, {"round": 0, "optimizer": "adam", "lr": 0.01, "batch_size": 8})
    sgd = trainer.fit(params, {"round": 0})
    assert not np.array_equal(adam.params["net.0.weight"], sgd.params["net.0.weight"])
    with pytest.raises(ValueError):
        trainer.fit(params, {"optimizer": "lbfgs"})
    with pytest.raises(ValueError):
        trainer.fit(params, {"lr": -1.0})


def test_wrong_parameters_are_rejected() -> None:
    trainer = make_trainer("breast_cancer", device="cpu")
    params = trainer.initial_parameters()
    bad_shape = dict(params, **{"net.0.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match="shape"):
        trainer.fit(bad_shape, {})
    missing = {k: v for k, v in params.items() if k != "net.2.bias"}
    with pytest.raises(ValueError, match="missing"):
        trainer.evaluate(missing, {})
    model = build_model("breast_cancer")
    with pytest.raises(ValueError, match="unexpected"):
        set_parameters(model, dict(params, extra=np.zeros(1, np.float32)))


def test_get_set_parameters_round_trip() -> None:
    model = build_model("mnist", seed=5)
    params = get_parameters(model)
    other = build_model("mnist", seed=6)
    set_parameters(other, params)
    assert all(np.array_equal(get_parameters(other)[k], params[k]) for k in params)


def test_trainer_uses_given_site_data() -> None:
    from client.training.data import site_data

    site = site_data("digits", 2, 3, "dirichlet", 0.1, seed=1)
    trainer = TorchTaskTrainer("digits", site, device="cpu", seed=1)
    assert trainer.site is site and trainer.device.type == "cpu"
    with pytest.raises(ValueError):
        make_trainer("breast_cancer", site=site)


def test_evaluate_global_of_an_untrained_model_is_near_chance() -> None:
    acc = evaluate_global("digits", get_parameters(build_model("digits")))
    assert 0.0 <= acc < 0.3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fedavg_breast_cancer_dirichlet_sites_reach_093(seed: int) -> None:
    accuracy = run_fedavg("breast_cancer", "dirichlet", 0.5, seed)
    print(f"breast_cancer dirichlet(0.5) seed {seed}:", [round(a, 4) for a in accuracy])
    assert accuracy[-1] >= 0.93, accuracy
    assert accuracy[-1] > accuracy[0] or accuracy[0] >= 0.93


def test_fedavg_digits_iid_sites_reach_085() -> None:
    accuracy = run_fedavg("digits", "iid", 0.5, seed=0)
    print("digits iid seed 0:", [round(a, 4) for a in accuracy])
    assert accuracy[-1] >= 0.85, accuracy
    assert accuracy[0] < accuracy[-1]
