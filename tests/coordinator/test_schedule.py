"""The run's local lr schedule: public, monotone, exact at its ends."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.core.state import apply, initial_state
from coordinator.round.schedule import scheduled_lr

lrs = st.floats(1e-4, 10.0)
finals = st.floats(1e-3, 1.0)


@given(lrs, finals, st.integers(1, 500), st.integers(0, 500))
def test_decays_from_lr_to_lr_final_and_never_leaves_that_range(lr, final, first, length):
    last = first + length
    values = [scheduled_lr(lr, final, r, first, last) for r in range(first - 2, last + 3)]
    assert values[2] == pytest.approx(lr)  # the run's first round (a one-round run: only)
    assert values[-3] == pytest.approx(lr * final if length else lr)
    assert values[-1] == pytest.approx(lr * final)  # past the run: clamped to its end
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:], strict=False))  # never rises
    assert all(lr * final - 1e-12 <= v <= lr + 1e-12 for v in values)


@given(lrs, st.integers(1, 100), st.integers(0, 100), st.integers(0, 300))
def test_lr_final_one_is_a_constant_lr(lr, first, length, rnd):
    assert scheduled_lr(lr, 1.0, rnd, first, first + length) == lr


@pytest.mark.parametrize("final", [0.0, -0.5, 1.5])
def test_lr_final_outside_0_1_is_refused(final):
    with pytest.raises(ValueError, match="lr_final"):
        scheduled_lr(0.1, final, 1, 1, 10)


def _trained(config: dict) -> dict:
    s = initial_state()
    assert apply(s, {"op": "genesis", "version": "0" * 64, "size": 10, "holders": ["n1", "n2"],
                     "cluster_size": 3})["ok"]
    for i in range(2):  # min_clients (2) sites can take part, else Train is refused
        assert apply(s, {"op": "enroll", "site": f"s{i}", "public_key": f"{i}" * 64})["ok"]
    r = apply(s, {"op": "train", "rounds": 5, "config": config})
    return s | {"_result": r}


def test_train_records_the_runs_first_round_and_validates_lr_final():
    s = _trained({"lr_final": 0.25})
    assert s["_result"]["ok"]
    assert s["training"]["first_round"] == 1 and s["training"]["target_round"] == 5
    assert s["training"]["config"]["lr_final"] == 0.25
    bad = _trained({"lr_final": 1.5})
    assert not bad["_result"]["ok"] and "lr_final" in bad["_result"]["error"]
    assert "first_round" not in bad["training"]  # a refused train changes nothing
