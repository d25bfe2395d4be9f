"""AES-CTR pseudorandom generator for masks, streamed into preallocated uint32 buffers.

Masks must be cryptographically strong (a weak generator lets the coordinator strip a
mask by brute force) and cheap: one AES-128-CTR keystream per mask, written in 1 MiB
chunks straight into a reusable numpy buffer, then added in place. No Python loop ever
touches single coordinates.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

MIN_KEY_BYTES = 16
"""Shortest key the generator accepts (128 bits); shorter keys are refused."""

_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)
_BLOCK = 16
_COUNTER0 = bytes(_BLOCK)


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray):
        raise TypeError("PRG key must be bytes")
    if len(key) < MIN_KEY_BYTES or len(key) not in (16, 24, 32):
        raise ValueError(
            f"PRG key must be 16, 24 or 32 bytes (at least {MIN_KEY_BYTES * 8} bits), "
            f"got {len(key)} bytes"
        )


def _fill(key: bytes, raw: memoryview, nbytes: int) -> None:
    """Write nbytes of AES-CTR keystream for key into raw (which has >= 15 bytes slack).

    Each key is used for exactly one stream, so a fixed all-zero initial counter is safe.
    """
    encryptor = Cipher(algorithms.AES(bytes(key)), modes.CTR(_COUNTER0)).encryptor()
    zeros = memoryview(_ZEROS)
    off = 0
    while off < nbytes:
        n = min(_CHUNK, nbytes - off)
        # update_into needs block_size - 1 spare bytes after the output.
        encryptor.update_into(zeros[:n], raw[off : off + n + _BLOCK - 1])
        off += n


class MaskStream:
    """A reusable scratch buffer that expands keys into uint32 mask vectors.

    Why a class: the server expands hundreds of masks per session; reusing one buffer
    avoids a large allocation per mask.
    """

    def __init__(self, length: int) -> None:
        if length < 0:
            raise ValueError("length must be non-negative")
        self.length = int(length)
        # 4 extra words of slack for update_into's block_size - 1 requirement.
        self._buf = np.empty(self.length + 4, dtype=np.uint32)
        self._raw = memoryview(self._buf).cast("B")

    def generate(self, key: bytes) -> np.ndarray:
        """Return the mask for key as a view into the scratch buffer (overwritten next call)."""
        _check_key(key)
        _fill(key, self._raw, self.length * 4)
        return self._buf[: self.length]

    def add_to(self, target: np.ndarray, key: bytes) -> None:
        """target += PRG(key) mod 2^32, in place."""
        self._check_target(target)
        np.add(target, self.generate(key), out=target)

    def subtract_from(self, target: np.ndarray, key: bytes) -> None:
        """target -= PRG(key) mod 2^32, in place."""
        self._check_target(target)
        np.subtract(target, self.generate(key), out=target)

    def _check_target(self, target: np.ndarray) -> None:
        if target.dtype != np.uint32 or target.shape != (self.length,):
            raise ValueError(
                f"target must be uint32 of shape ({self.length},), "
                f"got {target.dtype} {target.shape}"
            )


def prg_uint32(key: bytes, length: int) -> np.ndarray:
    """Expand key into `length` uniformly random uint32 words (a fresh array)."""
    return MaskStream(length).generate(key).copy()


def prg_uint64(key: bytes, length: int) -> np.ndarray:
    """Expand key into `length` uniformly random uint64 words (a fresh array)."""
    _check_key(key)
    buf = np.empty(length + 2, dtype=np.uint64)
    _fill(key, memoryview(buf).cast("B"), length * 8)
    return buf[:length].copy()
