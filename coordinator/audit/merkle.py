"""RFC 6962 Merkle tree hashing over audit entry hashes.

Checkpoints sign the Merkle tree head (MTH, RFC 6962 section 2.1) of the first ``n`` entry
hashes. The leaf data is the 32 raw bytes of an entry hash, so

* leaf hash  = SHA-256(0x00 || entry_hash)
* node hash  = SHA-256(0x01 || left || right)
* MTH({})    = SHA-256("")

and for ``n > 1`` the tree splits at the largest power of two below ``n``. The distinct leaf
and node prefixes stop a second-preimage trick where an inner node poses as a leaf.

The accumulator keeps only the roots of the perfect subtrees that the binary expansion of
``n`` dictates (a "compact range"), so appending is O(log n) time and memory and a
writer or verifier can read off the head at any size without rehashing the whole log.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """Hash of one leaf: SHA-256(0x00 || data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash of an inner node: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """MTH of ``leaves`` (leaf data, not leaf hashes) by the recursive RFC 6962 definition.

    This is the reference the accumulator is tested against; it is O(n) time and
    O(log n) recursion depth.
    """
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaf_hash(leaves[0])
    k = 1 << ((n - 1).bit_length() - 1)  # largest power of two strictly below n
    return node_hash(merkle_root(leaves[:k]), merkle_root(leaves[k:]))


class MerkleAccumulator:
    """Append-only RFC 6962 tree head, kept as the roots of its perfect subtrees."""

    __slots__ = ("_peaks", "_size")

    def __init__(self) -> None:
        # (height, hash) of each perfect subtree, largest (leftmost) first.
        self._peaks: list[tuple[int, bytes]] = []
        self._size = 0

    @property
    def size(self) -> int:
        """Number of leaves appended so far."""
        return self._size

    def append(self, data: bytes) -> None:
        """Append one leaf (its data, e.g. a raw 32-byte entry hash)."""
        height, digest = 0, leaf_hash(data)
        peaks = self._peaks
        while peaks and peaks[-1][0] == height:
            digest = node_hash(peaks.pop()[1], digest)
            height += 1
        peaks.append((height, digest))
        self._size += 1

    def extend(self, items: Iterable[bytes]) -> None:
        """Append many leaves in order."""
        for data in items:
            self.append(data)

    def root(self) -> bytes:
        """MTH of everything appended so far.

        Folding the peaks right to left reproduces the RFC split: the largest peak is the
        left subtree of size 2^k, and the rest is the tree of the remaining leaves.
        """
        if not self._peaks:
            return EMPTY_ROOT
        digest = self._peaks[-1][1]
        for _, left in reversed(self._peaks[:-1]):
            digest = node_hash(left, digest)
        return digest

    def copy(self) -> MerkleAccumulator:
        """An independent copy, so a writer can stage an append and drop it on rollback."""
        twin = MerkleAccumulator()
        twin._peaks = list(self._peaks)
        twin._size = self._size
        return twin
