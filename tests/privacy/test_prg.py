"""Mask generator: AES-CTR output, key length floor, chunked in-place arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.prg import MIN_KEY_BYTES, apply_masks, prg_uint32, prg_uint64


def test_matches_aes_ctr_keystream_across_chunk_boundaries() -> None:
    key = bytes(range(16))
    n = (1 << 18) + 3  # more than one 1 MiB chunk, odd length
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    want = np.frombuffer(enc.update(bytes(4 * n)), dtype="<u4")
    assert np.array_equal(prg_uint32(key, n), want)
    assert np.array_equal(prg_uint64(key, n // 2).view("<u4"), want[: 2 * (n // 2)])
    y = np.zeros(n, dtype=np.uint32)
    apply_masks(y, add=[key])
    assert np.array_equal(y, want)


def test_short_keys_refused() -> None:
    assert MIN_KEY_BYTES * 8 >= 128
    for bad in (b"", b"k" * 8, b"k" * 15, b"k" * 17):
        with pytest.raises(ValueError):
            prg_uint32(bad, 4)
        with pytest.raises(ValueError):
            apply_masks(np.zeros(4, np.uint32), add=[b"a" * 16], subtract=[bad])


@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(0, 3000),
    chunk_words=st.integers(1, 40).map(lambda c: 4 * c),
    add=st.lists(st.binary(min_size=16, max_size=16), max_size=4),
    subtract=st.lists(st.binary(min_size=16, max_size=16), max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_chunked_masks_equal_full_length_masks_applied_in_turn(
    length: int, chunk_words: int, add: list[bytes], subtract: list[bytes], seed: int
) -> None:
    x = np.random.default_rng(seed).integers(0, 2**32, length, dtype=np.uint32)
    want = x.copy()
    for key in add:
        want += prg_uint32(key, length)
    for key in subtract:
        want -= prg_uint32(key, length)
    got = x.copy()
    apply_masks(got, add, subtract, chunk_words=chunk_words)
    assert np.array_equal(got, want)
    apply_masks(got, subtract, add, chunk_words=chunk_words)  # the inverse restores x
    assert np.array_equal(got, x)
    cut = (length // 3) // 4 * 4  # two slices, the second starting on an AES block
    head, tail = x[:cut].copy(), x[cut:].copy()
    apply_masks(head, add, subtract, chunk_words=chunk_words)
    apply_masks(tail, add, subtract, offset_words=cut, chunk_words=chunk_words)
    assert np.array_equal(np.concatenate([head, tail]), want)


def test_masks_look_uniform_and_bad_targets_are_refused() -> None:
    x = np.arange(50_000, dtype=np.uint32)
    y = x.copy()
    apply_masks(y, add=[b"a" * 16])
    assert np.mean(y != x) > 0.999
    assert abs(float(np.mean(prg_uint32(b"a" * 16, 50_000))) / 2**32 - 0.5) < 0.01
    for bad in (np.zeros(10, np.int64), np.zeros((2, 5), np.uint32), np.zeros(20, np.uint32)[::2]):
        with pytest.raises(ValueError):
            apply_masks(bad, add=[b"a" * 16])
    frozen = np.zeros(8, np.uint32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError):
        apply_masks(frozen, add=[b"a" * 16])
    with pytest.raises(ValueError):
        apply_masks(np.zeros(8, np.uint32), add=[b"a" * 16], chunk_words=6)
    with pytest.raises(ValueError):
        apply_masks(np.zeros(8, np.uint32), add=[b"a" * 16], offset_words=2)
