"""Public top-K index sets and error feedback for sparse secure aggregation.

Pairwise masks only cancel on coordinates that every client sends, and a per-client
top-K set would reveal which coordinates mattered to each site. So every party computes
the same public index set for a round from public data only (the last global model
change and the round seed); it never depends on one site's data and costs no privacy.

Error feedback keeps what a client did not send (unsent coordinates and the parts cut
off by clipping) in a local residual that is added to the next round's update, so
nothing is lost, only delayed. The helpers are pure functions; the caller keeps the
residual.

Per-client pipeline: corrected = apply_error_feedback(delta, residual);
values = project(corrected, idx); clipped, _ = clip_values(values, c);
residual = new_residual(corrected, idx, clipped); encode and mask `clipped`.
Server: scatter(decoded_sum, idx, dim).
"""

from __future__ import annotations

import hashlib

import numpy as np

from privacy.prg import prg_uint64

_INDEX_DOMAIN = b"fedraft/public-index-set/v1"


def public_index_set(
    dim: int,
    k: int,
    last_global_change: np.ndarray | None,
    round_seed: bytes,
    top_fraction: float = 0.5,
) -> np.ndarray:
    """The round's K coordinates: top |last global change| plus seeded random ones.

    floor(k * top_fraction) coordinates are the largest |last_global_change| (ties go to
    the lower index, so every party picks the same ones); the rest are drawn uniformly
    without replacement from the remaining coordinates with AES-CTR keyed by the round
    seed (numpy's distribution algorithms may change between versions, this may not).
    With no last change (first round) all K are random. Returns sorted int64 indices.
    """
    dim = _check_int("dim", dim, 1)
    k = _check_int("k", k, 0)
    if k > dim:
        raise ValueError(f"k ({k}) exceeds dim ({dim})")
    if not isinstance(round_seed, bytes | bytearray):
        raise TypeError("round_seed must be bytes")
    if not 0.0 <= top_fraction <= 1.0:
        raise ValueError("top_fraction must be in [0, 1]")
    taken = np.zeros(dim, dtype=bool)
    parts: list[np.ndarray] = []
    if last_global_change is not None:
        change = np.asarray(last_global_change)
        if change.shape != (dim,):
            raise ValueError(f"last_global_change must have shape ({dim},)")
        if not np.all(np.isfinite(change)):
            raise ValueError("last_global_change contains NaN or infinity")
        top = _top_indices(np.abs(change.astype(np.float64)), int(k * top_fraction))
        taken[top] = True
        parts.append(top)
    need = k - sum(p.shape[0] for p in parts)
    if need:
        parts.append(_seeded_sample(dim, need, taken, bytes(round_seed), k))
    if not parts:
        return np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate(parts)).astype(np.int64)


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}")
    return int(value)


def _top_indices(magnitude: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` largest values; ties broken towards lower indices."""
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    n = magnitude.shape[0]
    kth = np.partition(magnitude, n - count)[n - count]  # count-th largest value
    above = np.flatnonzero(magnitude > kth)
    ties = np.flatnonzero(magnitude == kth)[: count - above.shape[0]]
    return np.concatenate([above, ties]).astype(np.int64)


def _seeded_sample(
    dim: int, need: int, taken: np.ndarray, round_seed: bytes, k: int
) -> np.ndarray:
    """`need` distinct untaken indices, uniform, from an AES-CTR stream of the seed.

    Rejection sampling on 64-bit words (no modulo bias); candidates are accepted in
    stream order, skipping repeats, so the result is a pure function of the inputs.
    """
    digest = hashlib.sha256(
        _INDEX_DOMAIN
        + len(round_seed).to_bytes(4, "big")
        + round_seed
        + dim.to_bytes(8, "big")
        + k.to_bytes(8, "big")
    ).digest()
    limit = ((1 << 64) // dim) * dim  # accept words below this: uniform mod dim
    picked: list[np.ndarray] = []
    got = 0
    free = dim - int(np.count_nonzero(taken))
    if need == free:  # everything left is chosen; no sampling needed
        return np.flatnonzero(~taken).astype(np.int64)
    batch_no = 0
    while got < need:
        # Draw enough words that about twice the missing indices are fresh ones.
        batch = int(min(1 << 23, max(4096, 2 * (need - got) * dim // max(free, 1))))
        # Each batch has its own key, so no counter state is carried between batches.
        key = hashlib.sha256(digest + batch_no.to_bytes(8, "big")).digest()[:16]
        words = prg_uint64(key, batch)
        if limit < 1 << 64:
            words = words[words < np.uint64(limit)]
        cand = (words % np.uint64(dim)).astype(np.int64)
        _, first = np.unique(cand, return_index=True)
        cand = cand[np.sort(first)]
        cand = cand[~taken[cand]][: need - got]
        taken[cand] = True
        picked.append(cand)
        got += cand.shape[0]
        free -= cand.shape[0]
        batch_no += 1
    return np.concatenate(picked)


def apply_error_feedback(delta: np.ndarray, residual: np.ndarray | None) -> np.ndarray:
    """corrected = delta + residual (the residual carries what earlier rounds held back)."""
    d = np.asarray(delta)
    if d.ndim != 1:
        raise ValueError("delta must be 1-D")
    if not np.all(np.isfinite(d)):
        raise ValueError("delta contains NaN or infinity")
    if residual is None:
        return d.astype(np.result_type(d.dtype, np.float32), copy=True)
    r = np.asarray(residual)
    if r.shape != d.shape:
        raise ValueError(f"residual shape {r.shape} != delta shape {d.shape}")
    return d + r


def _check_idx(idx: np.ndarray, dim: int) -> np.ndarray:
    i = np.asarray(idx)
    if i.ndim != 1 or not np.issubdtype(i.dtype, np.integer):
        raise ValueError("idx must be a 1-D integer array")
    if i.shape[0] and (i[0] < 0 or i[-1] >= dim or np.any(np.diff(i) <= 0)):
        raise ValueError("idx must be sorted, unique and within [0, dim)")
    return i


def project(corrected: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The values at the public index set (a copy)."""
    c = np.asarray(corrected)
    return c[_check_idx(idx, c.shape[0])].copy()


def clip_values(values: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Clip each value to [-c, c]; returns (clipped, overflow) with values = clipped + overflow.

    The overflow is the part the encoder cannot carry; it stays in the residual.
    """
    if not (np.isfinite(c) and c > 0):
        raise ValueError("c must be a positive finite number")
    v = np.asarray(values)
    clipped = np.clip(v, -c, c)
    return clipped, v - clipped


def new_residual(
    corrected: np.ndarray, idx: np.ndarray, clipped_values: np.ndarray
) -> np.ndarray:
    """residual = corrected - scatter(clipped_values): everything that was not sent."""
    c = np.asarray(corrected)
    i = _check_idx(idx, c.shape[0])
    v = np.asarray(clipped_values)
    if v.shape != i.shape:
        raise ValueError("clipped_values and idx differ in length")
    residual = c.copy()
    residual[i] -= v
    return residual


def scatter(values: np.ndarray, idx: np.ndarray, dim: int) -> np.ndarray:
    """Dense float64 vector of length dim with values at idx and zeros elsewhere."""
    i = _check_idx(idx, dim)
    v = np.asarray(values)
    if v.shape != i.shape:
        raise ValueError("values and idx differ in length")
    out = np.zeros(dim, dtype=np.float64)
    out[i] = v
    return out
