"""AES-CTR pseudorandom generator for masks, applied to uint32 vectors in cache-sized chunks.

Masks must be cryptographically strong (a weak generator lets the coordinator strip a
mask by brute force) and cheap. Each mask is one AES-128-CTR keystream. A SecAgg+ party
applies many masks to one vector, so `apply_masks` walks the vector a chunk at a time
and, for each chunk, expands every key's next stretch of keystream into a small scratch
buffer and adds or subtracts it while the chunk is still in cache. No Python loop ever
touches single coordinates, and no full-length scratch vector is allocated.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

MIN_KEY_BYTES = 16
"""Shortest key the generator accepts (128 bits); shorter keys are refused."""

CHUNK_WORDS = 1 << 17
"""Words per chunk in apply_masks: 512 KiB of target and 512 KiB of keystream."""

_FILL_CHUNK = 1 << 20
_ZEROS = bytes(_FILL_CHUNK)
_BLOCK = 16
_COUNTER0 = bytes(_BLOCK)


def check_key(key: bytes) -> None:
    """Refuse anything but a 16, 24 or 32-byte key (ValueError, TypeError)."""
    if not isinstance(key, bytes | bytearray):
        raise TypeError("PRG key must be bytes")
    if len(key) < MIN_KEY_BYTES or len(key) not in (16, 24, 32):
        raise ValueError(
            f"PRG key must be 16, 24 or 32 bytes (at least {MIN_KEY_BYTES * 8} bits), "
            f"got {len(key)} bytes"
        )


def keystream(key: bytes, start_block: int = 0) -> CipherContext:
    """The AES-CTR keystream for key, from its 16-byte block number start_block.

    Each key is used for exactly one stream, so a fixed all-zero initial counter is safe;
    starting later in it lets several processes expand disjoint slices of one mask.
    """
    check_key(key)
    if not 0 <= start_block < 1 << 64:
        raise ValueError(f"start_block out of range: {start_block}")
    counter = start_block.to_bytes(_BLOCK, "big")
    return Cipher(algorithms.AES(bytes(key)), modes.CTR(counter)).encryptor()


def _fill(key: bytes, raw: memoryview, nbytes: int) -> None:
    """Write nbytes of key's keystream into raw (which has >= 15 bytes slack)."""
    stream = keystream(key)
    zeros = memoryview(_ZEROS)
    off = 0
    while off < nbytes:
        n = min(_FILL_CHUNK, nbytes - off)
        # update_into needs block_size - 1 spare bytes after the output.
        stream.update_into(zeros[:n], raw[off : off + n + _BLOCK - 1])
        off += n


def check_target(target: np.ndarray) -> None:
    """Refuse anything but a contiguous, writeable 1-d uint32 array (ValueError)."""
    if not isinstance(target, np.ndarray) or target.dtype != np.uint32 or target.ndim != 1:
        raise ValueError(f"target must be a 1-d uint32 array, got {getattr(target, 'dtype', type(target))}")
    if not target.flags.c_contiguous or not target.flags.writeable:
        raise ValueError("target must be contiguous and writeable")


def apply_masks(
    target: np.ndarray,
    add: Iterable[bytes] = (),
    subtract: Iterable[bytes] = (),
    *,
    offset_words: int = 0,
    chunk_words: int = CHUNK_WORDS,
) -> None:
    """target += sum of PRG(k) for k in add, minus sum of PRG(k) for k in subtract, mod 2^32.

    Why chunked: streaming the whole vector once per key moves every mask through main
    memory; a chunk of target stays in cache while every key's keystream for it is
    applied. The result equals applying the full-length masks one after another.
    target may be the slice of a longer vector that starts at word offset_words (a
    multiple of 4, one AES block); it then gets that slice of each mask.
    """
    check_target(target)
    if chunk_words < 4 or chunk_words % 4 or chunk_words * 4 > _FILL_CHUNK:
        raise ValueError(f"chunk_words must be a multiple of 4 up to {_FILL_CHUNK // 4}")
    if offset_words < 0 or offset_words % 4:
        raise ValueError(f"offset_words must be a non-negative multiple of 4, got {offset_words}")
    block = offset_words // 4
    ops = [(keystream(k, block), np.add) for k in add]
    ops += [(keystream(k, block), np.subtract) for k in subtract]
    length = target.shape[0]
    if not ops or length == 0:
        return
    chunk = min(chunk_words, length)
    # 4 extra words of slack for update_into's block_size - 1 requirement.
    scratch = np.empty(chunk + 4, dtype=np.uint32)
    raw = memoryview(scratch).cast("B")
    zeros = memoryview(_ZEROS)
    for off in range(0, length, chunk):
        n = min(chunk, length - off)
        part, mask = target[off : off + n], scratch[:n]
        for stream, op in ops:
            stream.update_into(zeros[: 4 * n], raw[: 4 * n + _BLOCK - 1])
            op(part, mask, out=part)


def prg_uint32(key: bytes, length: int) -> np.ndarray:
    """Expand key into `length` uniformly random uint32 words (a fresh array)."""
    buf = np.empty(length + 4, dtype=np.uint32)
    _fill(key, memoryview(buf).cast("B"), length * 4)
    return buf[:length].copy()


def prg_uint64(key: bytes, length: int) -> np.ndarray:
    """Expand key into `length` uniformly random uint64 words (a fresh array)."""
    buf = np.empty(length + 2, dtype=np.uint64)
    _fill(key, memoryview(buf).cast("B"), length * 8)
    return buf[:length].copy()
