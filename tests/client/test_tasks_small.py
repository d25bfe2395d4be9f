"""The DP-friendly ``digits_small`` task: the digits data under a small model."""

from __future__ import annotations

import numpy as np

from client.training.data import site_data
from client.training.tasks import (
    TASK_DEFAULTS,
    TASKS,
    build_model,
    evaluate_global,
    make_trainer,
    task_dataset,
)


def test_digits_small_trains_on_the_digits_data() -> None:
    assert "digits_small" in TASKS and "digits_small" in TASK_DEFAULTS
    assert task_dataset("digits_small") == "digits"
    assert task_dataset("digits") == "digits" and task_dataset("mnist") == "mnist"
    trainer = make_trainer("digits_small", site_index=1, num_sites=5, seed=2, device="cpu")
    expected = site_data("digits", 1, 5, "iid", 0.5, 2)
    assert np.array_equal(trainer.site.x_train, expected.x_train)
    # a site of the digits data is accepted as is
    assert make_trainer("digits_small", site=expected, device="cpu").site is expected


def test_digits_small_is_small_and_learns() -> None:
    params = sum(p.numel() for p in build_model("digits_small").parameters())
    assert params == 10 * (64 + 8 * 64) + 10  # pixels + eight directed edge maps, per class
    assert params < sum(p.numel() for p in build_model("digits").parameters()) // 5
    # the fixed feature filters are not sent: only the trained Linear is in the state
    assert set(build_model("digits_small").state_dict()) == {"classifier.weight", "classifier.bias"}
    trainer = make_trainer("digits_small", site_index=0, num_sites=1, seed=0, device="cpu")
    start = trainer.initial_parameters()
    before = evaluate_global("digits_small", start)
    trained = trainer.fit(start, {"round": 0}).params
    assert evaluate_global("digits_small", trained) > max(0.8, before)
