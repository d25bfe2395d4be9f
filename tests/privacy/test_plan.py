"""The site's pipeline stages composed by privacy.plan: error feedback, projection,
clip and the residual's decay."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.plan import make_round_plan, sparsify_update


def _plan(dim: int, compression: float, decay: float, clip: float = 0.5):
    return make_round_plan(federation="f", round_number=3, attempt=1, term=2, seed=b"s" * 32,
                           participants=["a", "b", "c"], dim=dim, last_global_change=None,
                           compression=compression, clip=clip, max_weight=100.0, secure=True,
                           residual_decay=decay)


@settings(max_examples=50, deadline=None)
@given(dim=st.integers(4, 300), compression=st.sampled_from([1.0, 2.0, 4.0, 10.0]),
       decay=st.floats(0.05, 1.0), seed=st.integers(0, 2**31))
def test_sent_plus_residual_is_decayed_input(dim, compression, decay, seed):
    rng = np.random.default_rng(seed)
    delta, residual = rng.normal(0, 0.4, dim), rng.normal(0, 0.4, dim)
    plan = _plan(dim, compression, decay)
    out = sparsify_update(delta, residual, plan, num_examples=50)
    sent = np.zeros(dim)
    sent[plan.indices] = out.values
    assert np.all(np.abs(out.values) <= plan.clip)
    # what was not sent carries over, shrunk by the decay; nothing else is lost
    np.testing.assert_allclose(out.residual, decay * (delta + residual - sent), atol=1e-12)
    assert out.weight == pytest.approx(0.5)


def test_plan_is_identical_for_every_party_and_checks_decay():
    a, b = _plan(1000, 10.0, 0.9), _plan(1000, 10.0, 0.9)
    assert np.array_equal(a.indices, b.indices) and a.k == 100
    with pytest.raises(ValueError, match="residual_decay"):
        _plan(10, 2.0, 0.0)
    with pytest.raises(ValueError, match="residual_decay"):
        _plan(10, 2.0, 1.5)
