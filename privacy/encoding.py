"""Fixed-point encoding of clipped float updates into Z_2^32 for secure summation.

Secure aggregation sums uint32 words mod 2^32, so each client's floats become integers
whose sum over all clients can never wrap. With n clients, each coordinate clipped to
[-c, c] and each weight in [0, w_max]:

    bound        = floor((2^31 - 1) / n)       largest |word| one client may contribute
    scale        = bound / c                    (about (2^31 - 1) / (n c))
    weight_scale = bound / w_max
    word         = floor(v * scale + u),  u ~ U[0, 1)      (stochastic rounding)

Because bound is an integer and |v * scale| <= bound, stochastic rounding stays within
[-bound, bound]; the sum of at most n words therefore lies in [-(2^31-1), 2^31-1] and the
decoder reads the uint32 sum as a signed int32 without ambiguity. Stochastic rounding is
unbiased (E[word] = v * scale), so quantisation adds zero-mean noise instead of a bias
that would accumulate over rounds. One quantum is 1 / scale.

The example weight is appended as one more word (encoded the same way with
weight_scale), so it is masked like the rest of the vector and only its sum is revealed.
If the caller wants a weighted average it multiplies its update by its weight before
encoding and chooses c for the weighted values; decode returns both sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT32_MAX = (1 << 31) - 1


@dataclass(frozen=True)
class FixedPointCodec:
    """Public encoding parameters shared by every client and the server of one round."""

    clip: float
    n_clients: int
    max_weight: float = 1.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise ValueError("clip must be a positive finite number")
        if not (np.isfinite(self.max_weight) and self.max_weight > 0):
            raise ValueError("max_weight must be a positive finite number")
        if not 1 <= self.n_clients <= INT32_MAX:
            raise ValueError("n_clients must be in [1, 2^31 - 1]")

    @property
    def bound(self) -> int:
        """Largest absolute word one client contributes: floor((2^31 - 1) / n)."""
        return INT32_MAX // self.n_clients

    @property
    def scale(self) -> float:
        """Words per unit of value; one quantum is 1 / scale."""
        return self.bound / self.clip

    @property
    def weight_scale(self) -> float:
        """Words per unit of weight."""
        return self.bound / self.max_weight

    def encode_values(self, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Clip to [-c, c], scale and stochastically round into uint32 words."""
        v = np.asarray(values, dtype=np.float64)
        if v.ndim != 1:
            raise ValueError("values must be a 1-D array")
        if not np.all(np.isfinite(v)):
            raise ValueError("values contain NaN or infinity")
        return _round_to_words(np.clip(v, -self.clip, self.clip) * self.scale, self.bound, rng)

    def encode_weight(self, weight: float, rng: np.random.Generator) -> np.uint32:
        """Encode one weight in [0, max_weight] as a single word."""
        w = float(weight)
        if not np.isfinite(w) or w < 0 or w > self.max_weight:
            raise ValueError(f"weight must be in [0, {self.max_weight}], got {weight}")
        word = _round_to_words(np.array([w * self.weight_scale]), self.bound, rng)
        return word[0]

    def encode(
        self, values: np.ndarray, weight: float, rng: np.random.Generator
    ) -> np.ndarray:
        """The vector a client masks: encoded values followed by the encoded weight."""
        out = np.empty(np.asarray(values).shape[0] + 1, dtype=np.uint32)
        out[:-1] = self.encode_values(values, rng)
        out[-1] = self.encode_weight(weight, rng)
        return out

    def decode_values(self, words: np.ndarray) -> np.ndarray:
        """Read summed value words as signed int32 and unscale to float64."""
        return _signed(words).astype(np.float64) / self.scale

    def decode_weight(self, word: np.uint32 | int) -> float:
        """Read a summed weight word."""
        return float(_signed(np.array([word], dtype=np.uint32))[0]) / self.weight_scale

    def decode(self, summed: np.ndarray) -> tuple[np.ndarray, float]:
        """Decode the unmasked sum of encode() outputs: (float64 value sum, weight sum)."""
        s = np.asarray(summed)
        if s.dtype != np.uint32 or s.ndim != 1 or s.shape[0] < 1:
            raise ValueError("summed must be a non-empty 1-D uint32 array")
        return self.decode_values(s[:-1]), self.decode_weight(s[-1])


def _round_to_words(scaled: np.ndarray, bound: int, rng: np.random.Generator) -> np.ndarray:
    """Stochastic rounding of scaled values (|x| <= bound) to two's complement uint32."""
    x = np.clip(scaled, -bound, bound)  # guards float rounding of clip * scale
    x += rng.random(x.shape[0])
    np.floor(x, out=x)
    np.clip(x, -bound, bound, out=x)
    return x.astype(np.int32).view(np.uint32)


def _signed(words: np.ndarray) -> np.ndarray:
    w = np.ascontiguousarray(words)
    if w.dtype != np.uint32:
        raise ValueError("words must be uint32")
    return w.view(np.int32)
