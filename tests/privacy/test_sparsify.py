"""Public index sets and error feedback."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from privacy.sparsify import (
    apply_error_feedback,
    clip_values,
    new_residual,
    project,
    public_index_set,
    scatter,
)

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=60, deadline=None)
@given(
    dim=st.integers(1, 400),
    data=st.data(),
    seed=st.binary(min_size=0, max_size=32),
    with_change=st.booleans(),
    top_fraction=st.floats(0, 1),
)
def test_index_set_identical_across_parties_and_of_size_k(
    dim: int, data: st.DataObject, seed: bytes, with_change: bool, top_fraction: float
) -> None:
    k = data.draw(st.integers(0, dim))
    change = data.draw(arrays(np.float64, dim, elements=finite)) if with_change else None
    # Two parties, each with its own copy of the public inputs.
    a = public_index_set(dim, k, None if change is None else change.copy(), bytes(seed),
                         top_fraction)
    b = public_index_set(dim, k, None if change is None else change.copy(), bytes(seed),
                         top_fraction)
    assert np.array_equal(a, b)
    assert a.dtype == np.int64 and a.shape == (k,)
    assert np.all(np.diff(a) > 0) and (k == 0 or (a[0] >= 0 and a[-1] < dim))
    if change is not None:
        n_top = int(k * top_fraction)
        if n_top:
            # Every chosen-as-top magnitude is at least as large as any unchosen one.
            chosen = np.zeros(dim, bool)
            chosen[a] = True
            mags = np.abs(change)
            kth = np.sort(mags)[::-1][n_top - 1]
            assert np.all(chosen[mags > kth])


def test_index_set_mixes_top_and_seeded_random() -> None:
    dim, k = 10_000, 200
    change = np.zeros(dim)
    top = np.arange(0, dim, 97)[:100]
    change[top] = np.linspace(5, 10, 100)
    idx = public_index_set(dim, k, change, b"round-7")
    assert set(top) <= set(idx.tolist())
    other = public_index_set(dim, k, change, b"round-8")
    assert set(top) <= set(other.tolist())
    assert not np.array_equal(idx, other)  # the random part follows the seed
    first = public_index_set(dim, k, None, b"round-7")
    assert len(set(first.tolist()) & set(top.tolist())) < 20  # all random
    assert np.array_equal(public_index_set(5, 5, None, b"s"), np.arange(5))
    assert public_index_set(5, 0, None, b"s").shape == (0,)


def test_index_set_random_part_is_roughly_uniform() -> None:
    dim, k = 1000, 500
    counts = np.zeros(dim)
    for r in range(40):
        counts[public_index_set(dim, k, None, r.to_bytes(4, "big"))] += 1
    # each coordinate is picked with probability 1/2; 40 draws -> mean 20, sd ~3.2
    assert abs(counts.mean() - 20) < 1e-9 and counts.min() > 3 and counts.max() < 37


def test_index_set_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        public_index_set(10, 11, None, b"s")
    with pytest.raises(ValueError):
        public_index_set(10, 3, np.zeros(9), b"s")
    with pytest.raises(ValueError):
        public_index_set(3, 1, np.array([0.0, np.nan, 1.0]), b"s")
    with pytest.raises(TypeError):
        public_index_set(10, 3, None, "seed")  # type: ignore[arg-type]


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    dim=st.integers(1, 200),
    c=st.floats(1e-3, 100),
    with_residual=st.booleans(),
)
def test_error_feedback_conserves_mass(
    data: st.DataObject, dim: int, c: float, with_residual: bool
) -> None:
    delta = data.draw(arrays(np.float64, dim, elements=finite))
    residual = data.draw(arrays(np.float64, dim, elements=finite)) if with_residual else None
    k = data.draw(st.integers(0, dim))
    idx = public_index_set(dim, k, None, data.draw(st.binary(max_size=8)))
    corrected = apply_error_feedback(delta, residual)
    values = project(corrected, idx)
    clipped, overflow = clip_values(values, c)
    assert np.all(np.abs(clipped) <= c)
    res = new_residual(corrected, idx, clipped)
    sent = scatter(clipped, idx, dim)
    # sent + residual == corrected; both unsent and clipped-off parts stay in the residual
    np.testing.assert_allclose(sent + res, corrected, rtol=1e-12, atol=1e-9)
    unsent = np.ones(dim, bool)
    unsent[idx] = False
    assert np.array_equal(res[unsent], corrected[unsent])
    assert np.array_equal(res[idx], overflow)
    assert np.array_equal(clipped + overflow, values) or np.allclose(clipped + overflow, values)


def test_error_feedback_input_checks() -> None:
    with pytest.raises(ValueError):
        apply_error_feedback(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError):
        apply_error_feedback(np.array([np.nan]), None)
    with pytest.raises(ValueError):
        project(np.zeros(5), np.array([3, 1]))  # unsorted
    with pytest.raises(ValueError):
        scatter(np.zeros(2), np.array([1, 5]), 5)  # out of range
    with pytest.raises(ValueError):
        clip_values(np.zeros(2), 0.0)


def test_ties_in_the_top_part_go_to_lower_indices() -> None:
    change = np.zeros(50)
    change[[3, 10, 20, 30, 40]] = 2.0  # five tied magnitudes, only three fit
    change[7] = 5.0
    idx = public_index_set(50, 4, change, b"s", top_fraction=1.0)
    assert idx.tolist() == [3, 7, 10, 20]
    flat = public_index_set(50, 6, np.ones(50), b"s", top_fraction=1.0)
    assert flat.tolist() == [0, 1, 2, 3, 4, 5]
