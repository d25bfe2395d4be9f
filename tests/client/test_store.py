"""The site's durable files (client/store.py): one atomic write for all of them, which
also makes the rename durable (the directory is fsynced), and keys that are never
overwritten and never readable by others."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from client import store
from client.store import DurableState, load_identity_key, load_residual, save_residual, write_atomic
from coordinator import wire


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What each os.fsync call synced: "dir" or "file"."""
    seen: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_write_atomic_replaces_and_syncs_file_then_directory(tmp_path: Path, synced: list[str]) -> None:
    path = tmp_path / "sub" / "f.json"
    write_atomic(path, b"one")
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two" and _leftovers(path.parent) == []
    assert synced == ["file", "dir", "file", "dir"]


def test_agent_state_save_syncs_the_directory(tmp_path: Path, synced: list[str]) -> None:
    state = DurableState(tmp_path)
    state.mark_joined("1.1.1")
    assert synced == ["file", "dir"]
    assert DurableState(tmp_path).joined("1.1.1") and _leftovers(tmp_path) == []
    assert (tmp_path / "agent-state.json").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o277])
def test_mode_is_exact_and_exclusive_never_replaces(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "k", b"secret", mode=0o600, exclusive=True)
        write_atomic(tmp_path / "c", b"cert", mode=0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o644
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "k", b"other", mode=0o600, exclusive=True)
    assert (tmp_path / "k").read_bytes() == b"secret" and _leftovers(tmp_path) == []


def test_exclusive_write_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_link(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "no hard links here")

    monkeypatch.setattr(os, "link", no_link)
    write_atomic(tmp_path / "k", b"secret", mode=0o600, exclusive=True)
    assert (tmp_path / "k").read_bytes() == b"secret" and _leftovers(tmp_path) == []
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "k", b"other", mode=0o600, exclusive=True)
    assert (tmp_path / "k").read_bytes() == b"secret"


def test_failed_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    write_atomic(path, b"old")

    def broken(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "disk on fire")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk on fire"):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_identity_key_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "identity.pem"
    key = store.write_identity_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert wire.public_key_hex(load_identity_key(path)) == wire.public_key_hex(key)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        store.write_identity_key(path)
    assert path.read_bytes() == before


def test_residual_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "residual.npy"
    save_residual(path, None)
    assert not path.exists() and load_residual(path, 3) is None
    save_residual(path, np.array([1.0, -2.0, 0.5]))
    assert np.load(path).tolist() == [1.0, -2.0, 0.5]  # still a plain .npy file
    assert load_residual(path, 3).tolist() == [1.0, -2.0, 0.5]  # type: ignore[union-attr]
    assert load_residual(path, 4) is None  # another model's length


def test_site_state_files_are_private(tmp_path: Path) -> None:
    """The residual and the agent's state are the site's alone: 0600, whatever the umask."""
    old = os.umask(0o022)
    try:
        save_residual(tmp_path / "residual.npy", np.ones(3))
        state = DurableState(tmp_path / "state")
        state.mark_joined("1.1.1")
    finally:
        os.umask(old)
    for path in (tmp_path / "residual.npy", state.path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
