"""One node's blob store: a damaged blob is never returned, it is set aside, and a good
copy replaces it (the cluster test heals one from a peer, leader and follower alike)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator import wire
from coordinator.cluster.blobs import BlobError, BlobStore, CorruptBlob


def test_a_damaged_blob_is_quarantined_not_returned(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = b"model bytes" * 100
    digest = store.put(data)
    assert store.get(digest) == data and store.intact(digest)
    path = tmp_path / digest
    path.write_bytes(data[:-1] + b"!")
    with pytest.raises(CorruptBlob):
        store.get(digest)
    assert not path.exists() and not store.has(digest)
    (kept,) = (tmp_path / "quarantine").iterdir()
    assert kept.name.startswith(digest) and kept.read_bytes().endswith(b"!")
    with pytest.raises(BlobError, match="no blob"):
        store.get(digest)


def test_putting_a_good_copy_replaces_a_damaged_one(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = b"x" * 4096
    digest = wire.sha256_hex(data)
    (tmp_path / digest).write_bytes(b"y" * 4096)  # damaged before anyone read it
    assert store.put(data, expected=digest) == digest
    assert store.get(digest) == data
    assert len(list((tmp_path / "quarantine").iterdir())) == 1
    with pytest.raises(BlobError, match="hashes to"):
        store.put(b"other", expected=digest)  # a wrong copy from a peer is refused
    assert store.get(digest) == data
