"""Shamir sharing: reconstruction, error cases, and that t-1 shares reveal nothing."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy import shamir
from privacy.shamir import PRIME, Share
from tests.privacy.sa_driver import det_rng


@settings(max_examples=60, deadline=None)
@given(
    secret=st.binary(min_size=0, max_size=64),
    n=st.integers(1, 20),
    data=st.data(),
)
def test_any_threshold_subset_reconstructs(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    shares = shamir.split(secret, n, t, det_rng(secret + bytes([n, t])))
    assert len(shares) == n and {s.x for s in shares} == set(range(1, n + 1))
    subset = data.draw(st.permutations(shares)).copy()[: data.draw(st.integers(t, n))]
    assert shamir.reconstruct(subset) == secret


def test_explicit_x_coordinates_and_leading_zero_bytes() -> None:
    secret = b"\x00\x00" + bytes(range(30))
    shares = shamir.split(secret, [7, 3, 42, 9], 3, det_rng(b"x"))
    assert [s.x for s in shares] == [7, 3, 42, 9]
    assert shamir.reconstruct(shares[1:]) == secret
    assert shamir.reconstruct([Share.from_bytes(s.to_bytes()) for s in shares[:3]]) == secret


def test_too_few_shares_rejected() -> None:
    shares = shamir.split(b"k" * 32, 5, 3, det_rng(b"few"))
    with pytest.raises(shamir.InsufficientSharesError):
        shamir.reconstruct(shares[:2])
    with pytest.raises(shamir.InsufficientSharesError):
        shamir.reconstruct([])


def test_duplicate_shares_rejected() -> None:
    shares = shamir.split(b"k" * 32, 5, 3, det_rng(b"dup"))
    with pytest.raises(shamir.DuplicateShareError):
        shamir.reconstruct([shares[0], shares[0], shares[1]])
    forged = Share(x=shares[0].x, y=(shares[0].y + 1) % PRIME, threshold=3)
    with pytest.raises(shamir.DuplicateShareError):
        shamir.reconstruct([shares[0], forged, shares[1]])
    with pytest.raises(shamir.DuplicateShareError):
        shamir.split(b"k", [1, 2, 2], 2, det_rng(b"d"))


def test_corrupted_extra_share_detected() -> None:
    shares = shamir.split(b"s" * 32, 5, 3, det_rng(b"bad"))
    bad = Share(x=shares[4].x, y=(shares[4].y + 5) % PRIME, threshold=3)
    with pytest.raises(shamir.InconsistentSharesError):
        shamir.reconstruct(shares[:4] + [bad])


def test_bad_parameters_and_encodings() -> None:
    with pytest.raises(shamir.ShamirError):
        shamir.split(b"x" * 65, 3, 2, det_rng(b"p"))
    with pytest.raises(shamir.ShamirError):
        shamir.split(b"x", 3, 4, det_rng(b"p"))
    with pytest.raises(shamir.ShamirError):
        shamir.split(b"x", 3, 0, det_rng(b"p"))
    with pytest.raises(shamir.ShamirError):
        Share.from_bytes(b"\x00" * 10)
    with pytest.raises(shamir.ShamirError):
        Share.from_bytes(b"\x00" * shamir.SHARE_BYTES)  # x = 0 is the secret itself
    mixed = shamir.split(b"x", 3, 2, det_rng(b"a"))[:1] + shamir.split(b"x", 3, 3, det_rng(b"b"))[1:]
    with pytest.raises(shamir.ShamirError):
        shamir.reconstruct(mixed)


def _poly_through(points: list[tuple[int, int]], p: int) -> list[int]:
    """Coefficients (low to high) of the interpolating polynomial, by expanding Lagrange."""
    coeffs = [0] * len(points)
    for i, (xi, yi) in enumerate(points):
        basis = [1]
        denom = 1
        for j, (xj, _) in enumerate(points):
            if j == i:
                continue
            basis = [(a - xj * b) % p for a, b in zip([0] + basis, basis + [0], strict=True)]
            denom = denom * (xi - xj) % p
        factor = yi * pow(denom, -1, p) % p
        coeffs = [(c + factor * b) % p for c, b in zip(coeffs, basis, strict=True)]
    return coeffs


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    target=st.binary(min_size=32, max_size=32),
    t=st.integers(2, 12),
    seed=st.binary(min_size=1, max_size=8),
)
def test_t_minus_one_shares_are_consistent_with_every_secret(
    secret: bytes, target: bytes, t: int, seed: bytes
) -> None:
    """For t-1 shares of `secret`, a degree < t polynomial hides any `target` as well."""
    shares = shamir.split(secret, t + 2, t, det_rng(seed))
    seen = shares[: t - 1]
    target_value = int.from_bytes(b"\x01" + target, "big")
    coeffs = _poly_through([(0, target_value)] + [(s.x, s.y) for s in seen], PRIME)
    assert len(coeffs) == t  # degree <= t - 1: a valid sharing polynomial
    assert coeffs[0] == target_value
    for s in seen:
        assert shamir.eval_poly(coeffs, s.x) == s.y
    # Completing with that polynomial's next share "reconstructs" the target instead.
    x_new = shares[t - 1].x
    fake = Share(x=x_new, y=shamir.eval_poly(coeffs, x_new), threshold=t)
    assert shamir.reconstruct(seen + [fake]) == target


def test_t_minus_one_shares_uniform_for_every_secret_exhaustive() -> None:
    """Over GF(13) with t = 3: any 2 shares have the same distribution for every secret."""
    p, t, xs = 13, 3, [2, 5, 9]
    distributions = []
    for secret in range(p):
        counts: Counter[tuple[int, ...]] = Counter()
        for a1, a2 in itertools.product(range(p), repeat=2):
            stream = iter([bytes([a1]), bytes([a2])])
            pts = shamir.split_int(secret, xs, t, lambda n, s=stream: next(s), prime=p)
            counts[tuple(y for _, y in pts[:2])] += 1  # the adversary's two shares
        assert len(counts) == p * p and set(counts.values()) == {1}  # uniform
        distributions.append(counts)
    assert all(d == distributions[0] for d in distributions)


def test_random_field_element_rejects_out_of_range() -> None:
    values = iter([bytes([15]), bytes([14]), bytes([13]), bytes([12])])
    assert shamir.random_field_element(lambda n: next(values), prime=13) == 12
    rnd = random.Random(1)
    draws = [shamir.random_field_element(lambda n: rnd.randbytes(n)) for _ in range(50)]
    assert all(0 <= d < PRIME for d in draws) and len(set(draws)) == 50
