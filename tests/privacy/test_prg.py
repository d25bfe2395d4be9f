"""Mask generator: AES-CTR output, key length floor, in-place arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from privacy.prg import MIN_KEY_BYTES, MaskStream, prg_uint32, prg_uint64


def test_matches_aes_ctr_keystream_across_chunk_boundaries() -> None:
    key = bytes(range(16))
    n = (1 << 18) + 3  # more than one 1 MiB chunk, odd length
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    want = np.frombuffer(enc.update(bytes(4 * n)), dtype="<u4")
    assert np.array_equal(prg_uint32(key, n), want)
    assert np.array_equal(prg_uint64(key, n // 2).view("<u4"), want[: 2 * (n // 2)])


def test_short_keys_refused() -> None:
    assert MIN_KEY_BYTES * 8 >= 128
    for bad in (b"", b"k" * 8, b"k" * 15, b"k" * 17):
        with pytest.raises(ValueError):
            prg_uint32(bad, 4)


def test_add_then_subtract_restores_and_masks_look_uniform() -> None:
    stream = MaskStream(50_000)
    x = np.arange(50_000, dtype=np.uint32)
    y = x.copy()
    stream.add_to(y, b"a" * 16)
    assert np.mean(y != x) > 0.999
    assert abs(float(np.mean(stream.generate(b"a" * 16))) / 2**32 - 0.5) < 0.01
    stream.subtract_from(y, b"a" * 16)
    assert np.array_equal(x, y)
    with pytest.raises(ValueError):
        stream.add_to(np.zeros(10, np.uint32), b"a" * 16)
    with pytest.raises(ValueError):
        stream.add_to(np.zeros(50_000, np.int64), b"a" * 16)
