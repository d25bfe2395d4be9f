"""Fixed-point encoding: round trip, no wrap at the worst case, unbiased rounding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from privacy.encoding import INT32_MAX, FixedPointCodec

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=80, deadline=None)
@given(
    values=arrays(np.float64, st.integers(1, 64), elements=finite),
    clip=st.floats(1e-3, 1e3),
    n=st.integers(1, 1000),
    weight=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_within_one_quantum(
    values: np.ndarray, clip: float, n: int, weight: float, seed: int
) -> None:
    codec = FixedPointCodec(clip=clip, n_clients=n, max_weight=1.0)
    words = codec.encode(values, weight, np.random.default_rng(seed))
    assert words.dtype == np.uint32 and words.shape == (values.shape[0] + 1,)
    dec, w = codec.decode(words)
    quantum = 1.0 / codec.scale
    assert np.all(np.abs(dec - np.clip(values, -clip, clip)) <= quantum * (1 + 1e-9))
    assert abs(w - weight) <= (1.0 / codec.weight_scale) * (1 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 200),
    clip=st.floats(1e-3, 1e3),
    signs=st.lists(st.sampled_from([-1.0, 1.0]), min_size=1, max_size=1),
    seed=st.integers(0, 2**32 - 1),
)
def test_worst_case_sum_does_not_wrap(n: int, clip: float, signs: list[float], seed: int) -> None:
    """n clients all at +c (or all at -c) with the largest weight: the sum decodes correctly."""
    codec = FixedPointCodec(clip=clip, n_clients=n, max_weight=50.0)
    rng = np.random.default_rng(seed)
    sign = signs[0]
    values = np.full(8, sign * clip * 10)  # beyond the clip range on purpose
    total = np.zeros(9, dtype=np.uint32)
    exact = np.zeros(9, dtype=np.int64)
    for _ in range(n):
        w = codec.encode(values, 50.0, rng)
        exact += w.view(np.int32)
        np.add(total, w, out=total)
    assert np.all(np.abs(exact) <= INT32_MAX)  # the integer sum fits in int32
    dec, weight = codec.decode(total)
    assert np.all(np.sign(dec) == sign)
    assert np.allclose(dec, sign * clip * n, rtol=0, atol=n / codec.scale)
    assert weight == pytest.approx(50.0 * n, abs=n / codec.weight_scale)


def test_sum_of_many_clients_decodes_to_the_sum() -> None:
    rng = np.random.default_rng(3)
    n, d = 37, 1000
    codec = FixedPointCodec(clip=2.0, n_clients=n, max_weight=10.0)
    xs = rng.uniform(-3, 3, size=(n, d))
    ws = rng.uniform(0, 10, size=n)
    total = np.zeros(d + 1, dtype=np.uint32)
    for x, w in zip(xs, ws, strict=True):
        np.add(total, codec.encode(x, w, rng), out=total)
    dec, weight = codec.decode(total)
    assert np.allclose(dec, np.clip(xs, -2, 2).sum(axis=0), atol=n / codec.scale)
    assert weight == pytest.approx(ws.sum(), abs=n / codec.weight_scale)


def test_stochastic_rounding_is_unbiased() -> None:
    codec = FixedPointCodec(clip=1.0, n_clients=1000)
    q = 1.0 / codec.scale
    value = (12345 + 0.3) * q  # 0.3 of a quantum above a grid point
    m = 200_000
    dec = codec.decode_values(codec.encode_values(np.full(m, value), np.random.default_rng(7)))
    # Each decoded value is the grid point below or above; the mean must match the value.
    assert set(np.round((dec - 12345 * q) / q).astype(int)) <= {0, 1}
    sigma = np.sqrt(0.3 * 0.7 / m) * q
    assert abs(dec.mean() - value) < 5 * sigma
    assert abs(dec.mean() - 12345 * q) > 100 * sigma  # round-to-nearest would fail this


def test_bad_inputs_rejected() -> None:
    codec = FixedPointCodec(clip=1.0, n_clients=3, max_weight=2.0)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        codec.encode(np.array([0.0, np.nan]), 1.0, rng)
    with pytest.raises(ValueError):
        codec.encode(np.array([np.inf]), 1.0, rng)
    with pytest.raises(ValueError):
        codec.encode(np.zeros(3), 2.5, rng)
    with pytest.raises(ValueError):
        codec.encode(np.zeros(3), -1.0, rng)
    with pytest.raises(ValueError):
        codec.decode(np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError):
        FixedPointCodec(clip=0.0, n_clients=3)
    with pytest.raises(ValueError):
        FixedPointCodec(clip=1.0, n_clients=0)
