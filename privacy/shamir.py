"""Shamir secret sharing over the prime field GF(2^521 - 1).

Why this field: 2^521 - 1 is a Mersenne prime larger than 2^512, so a 32-byte seed or an
X25519 private key (and anything up to 64 bytes) is a single field element and one
polynomial shares it. Any `threshold` shares determine the secret; fewer are consistent
with every secret equally (each candidate secret has exactly one polynomial through the
given shares), so they reveal nothing.

Secrets are encoded as the integer of ``0x01 || secret``: the marker byte keeps leading
zero bytes of the secret, and a reconstruction from inconsistent shares almost surely
lacks it, which is reported instead of returning garbage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

PRIME = (1 << 521) - 1
"""The field modulus."""

FIELD_BYTES = 66
MAX_SECRET_BYTES = 64
_X_BYTES = 4
_T_BYTES = 2
SHARE_BYTES = _X_BYTES + _T_BYTES + FIELD_BYTES
"""Length of a serialized share."""


class ShamirError(ValueError):
    """Shares cannot be made or combined."""


class InsufficientSharesError(ShamirError):
    """Fewer shares than the threshold: the secret is information-theoretically hidden."""


class DuplicateShareError(ShamirError):
    """Two shares with the same x coordinate."""


class InconsistentSharesError(ShamirError):
    """The shares do not lie on one polynomial of degree threshold - 1."""


@dataclass(frozen=True)
class Share:
    """One point (x, f(x)) of the sharing polynomial, tagged with its threshold."""

    x: int
    y: int
    threshold: int

    def __post_init__(self) -> None:
        if not 1 <= self.x < min(PRIME, 1 << (8 * _X_BYTES)):
            raise ShamirError(f"share x out of range: {self.x}")
        if not 0 <= self.y < PRIME:
            raise ShamirError("share y out of range")
        if not 1 <= self.threshold < (1 << (8 * _T_BYTES)):
            raise ShamirError(f"share threshold out of range: {self.threshold}")

    def to_bytes(self) -> bytes:
        """Fixed-length big-endian encoding: x (4) || threshold (2) || y (66)."""
        return (
            self.x.to_bytes(_X_BYTES, "big")
            + self.threshold.to_bytes(_T_BYTES, "big")
            + self.y.to_bytes(FIELD_BYTES, "big")
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Parse `to_bytes` output; raises ShamirError on any malformed input."""
        if not isinstance(data, bytes | bytearray) or len(data) != SHARE_BYTES:
            raise ShamirError(f"a share is exactly {SHARE_BYTES} bytes")
        x = int.from_bytes(data[:_X_BYTES], "big")
        t = int.from_bytes(data[_X_BYTES : _X_BYTES + _T_BYTES], "big")
        y = int.from_bytes(data[_X_BYTES + _T_BYTES :], "big")
        return cls(x=x, y=y, threshold=t)


def random_field_element(rng: Callable[[int], bytes], prime: int = PRIME) -> int:
    """Uniform element of GF(prime) by rejection sampling (no modulo bias)."""
    nbits = prime.bit_length()
    nbytes = (nbits + 7) // 8
    mask = (1 << nbits) - 1
    while True:
        raw = rng(nbytes)
        if len(raw) != nbytes:
            raise ShamirError("rng returned the wrong number of bytes")
        value = int.from_bytes(raw, "big") & mask
        if value < prime:
            return value


def eval_poly(coeffs: Sequence[int], x: int, prime: int = PRIME) -> int:
    """Evaluate sum(coeffs[i] * x^i) mod prime (Horner)."""
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % prime
    return acc


def _inverse_denominators(xs: Sequence[int], prime: int) -> list[int]:
    """1 / prod_{j != i} (x_i - x_j) for every i, with a single modular inversion."""
    dens = []
    for i, xi in enumerate(xs):
        d = 1
        for j, xj in enumerate(xs):
            if j != i:
                d = d * (xi - xj) % prime
        dens.append(d)
    # Montgomery's trick: invert the product once, then peel off each factor.
    prefix = [1]
    for d in dens:
        prefix.append(prefix[-1] * d % prime)
    inv = pow(prefix[-1], -1, prime)
    out = [0] * len(dens)
    for i in range(len(dens) - 1, -1, -1):
        out[i] = inv * prefix[i] % prime
        inv = inv * dens[i] % prime
    return out


def _interpolate(
    xs: Sequence[int], ys: Sequence[int], inv_dens: Sequence[int], z: int, prime: int
) -> int:
    """Lagrange value at z given precomputed inverse denominators (O(len(xs)))."""
    k = len(xs)
    diffs = [(z - x) % prime for x in xs]
    suffix = [1] * (k + 1)
    for i in range(k - 1, -1, -1):
        suffix[i] = suffix[i + 1] * diffs[i] % prime
    total = 0
    prefix = 1
    for i in range(k):
        total = (total + ys[i] * inv_dens[i] % prime * prefix % prime * suffix[i + 1]) % prime
        prefix = prefix * diffs[i] % prime
    return total


def lagrange_at(points: Sequence[tuple[int, int]], x: int, prime: int = PRIME) -> int:
    """Value at x of the unique polynomial of degree < len(points) through points."""
    xs = [p[0] % prime for p in points]
    if len(set(xs)) != len(xs):
        raise DuplicateShareError("duplicate x coordinates")
    return _interpolate(xs, [p[1] for p in points], _inverse_denominators(xs, prime), x, prime)


def split_int(
    secret: int,
    xs: Sequence[int],
    threshold: int,
    rng: Callable[[int], bytes],
    prime: int = PRIME,
) -> list[tuple[int, int]]:
    """Share a field element: points (x, f(x)) of a random f with f(0) = secret."""
    if not 0 <= secret < prime:
        raise ShamirError("secret is not a field element")
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"threshold must be in [1, {len(xs)}], got {threshold}")
    if len(set(xs)) != len(xs):
        raise DuplicateShareError("duplicate x coordinates requested")
    if any(not 0 < x < prime for x in xs):
        raise ShamirError("x coordinates must be non-zero field elements")
    coeffs = [secret] + [random_field_element(rng, prime) for _ in range(threshold - 1)]
    return [(x, eval_poly(coeffs, x, prime)) for x in xs]


def split(
    secret: bytes,
    n_or_xs: int | Sequence[int],
    threshold: int,
    rng: Callable[[int], bytes],
) -> list[Share]:
    """Split secret (at most 64 bytes) into shares; any `threshold` of them recover it.

    n_or_xs: a share count n (x = 1..n) or explicit distinct x coordinates (SecAgg uses
    the holder's participant index, so the server can check who sent which share).
    rng: an os.urandom-like callable, the only source of randomness.
    """
    if not isinstance(secret, bytes | bytearray):
        raise TypeError("secret must be bytes")
    if len(secret) > MAX_SECRET_BYTES:
        raise ShamirError(f"secret longer than {MAX_SECRET_BYTES} bytes")
    if isinstance(n_or_xs, int):
        if n_or_xs < 1:
            raise ShamirError("need at least one share")
        xs: list[int] = list(range(1, n_or_xs + 1))
    else:
        xs = [int(x) for x in n_or_xs]
    if any(x >= 1 << (8 * _X_BYTES) for x in xs):
        raise ShamirError("x coordinate does not fit in a share")
    value = int.from_bytes(b"\x01" + bytes(secret), "big")
    points = split_int(value, xs, threshold, rng)
    return [Share(x=x, y=y, threshold=threshold) for x, y in points]


def reconstruct(shares: Sequence[Share]) -> bytes:
    """Recover the secret from at least `threshold` distinct shares.

    Extra shares beyond the threshold are checked against the polynomial, so a corrupted
    share is reported (InconsistentSharesError) rather than silently changing the secret.
    """
    if not shares:
        raise InsufficientSharesError("no shares given")
    thresholds = {s.threshold for s in shares}
    if len(thresholds) != 1:
        raise ShamirError("shares disagree on the threshold")
    threshold = thresholds.pop()
    xs = [s.x for s in shares]
    if len(set(xs)) != len(xs):
        raise DuplicateShareError("duplicate shares (same x coordinate)")
    if len(shares) < threshold:
        raise InsufficientSharesError(
            f"{len(shares)} shares given, threshold is {threshold}"
        )
    ordered = sorted(shares, key=lambda s: s.x)
    xs = [s.x for s in ordered[:threshold]]
    ys = [s.y for s in ordered[:threshold]]
    inv_dens = _inverse_denominators(xs, PRIME)
    for extra in ordered[threshold:]:
        if _interpolate(xs, ys, inv_dens, extra.x, PRIME) != extra.y:
            raise InconsistentSharesError(f"share at x={extra.x} is not on the polynomial")
    value = _interpolate(xs, ys, inv_dens, 0, PRIME)
    raw = value.to_bytes(FIELD_BYTES, "big").lstrip(b"\x00")
    if not raw or raw[0] != 1 or len(raw) - 1 > MAX_SECRET_BYTES:
        raise InconsistentSharesError("reconstructed value is not an encoded secret")
    return raw[1:]
