"""The site's durable files, all written one way.

A site keeps little on disk, but what it keeps guards promises it made: `agent-state.json`
records the sessions it fed an update (invariant 5: never a second update into one
session) and the DP runs the leader has not yet confirmed; `residual.npy` is the
error-feedback residual of its last update; `dp-accountant.json` (client/dp/ledger.py) is
the privacy already spent; the identity key is who the site is. A torn or lost write of
any of them after a crash breaks a promise, so every durable write on the site goes
through `write_atomic`: a temporary file in the same directory, fsync, rename, then fsync
of the directory, so that the rename itself survives a power cut.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import wire

log = logging.getLogger(__name__)

STATE_FILE = "agent-state.json"
RESIDUAL_FILE = "residual.npy"

_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK})


# ---------------------------------------------------------------- writing


def fsync_dir(directory: Path) -> None:
    """Make the renames and creations in `directory` durable (POSIX needs the directory's
    own fsync for that; the file's fsync covers only its contents)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int | None = 0o600,
                 exclusive: bool = False) -> None:
    """Write `data` to `path` so that a reader, even after a power cut, sees the old file
    or the new one, never a torn one.

    `mode` sets the file's permissions exactly (the umask does not narrow them); the
    default, 0600, suits a site's own files (its residual, its ledger, its agent state are
    nobody else's business). `exclusive` never replaces an existing file (FileExistsError,
    nothing written): for keys, which must not be overwritten.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write_new(tmp, data, mode)
        if exclusive:
            _link_new(tmp, path, data, mode)
        else:
            os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)  # left only by a failure, or beside the link of an exclusive write
        except FileNotFoundError:
            pass
    fsync_dir(path.parent)


def _write_new(path: Path, data: bytes, mode: int | None) -> None:
    """Create `path`, which must not exist, holding `data` flushed to the disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    with os.fdopen(fd, "wb") as fh:
        if mode is not None:
            os.fchmod(fh.fileno(), mode)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _link_new(tmp: Path, path: Path, data: bytes, mode: int | None) -> None:
    """Give the complete `tmp` the name `path` unless that name exists. A hard link is the
    one atomic create-if-absent; where the file system has none, create `path` exclusively
    and write it in place (a crash may then leave it partial, never a replaced one)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        _write_new(path, data, mode)


# ---------------------------------------------------------------- identity key


class StateDirBusy(RuntimeError):
    """Another agent runs on this state directory."""


def lock_state_dir(state_dir: Path) -> Any:
    """Hold `state_dir/agent.lock` for this process's life (an flock, released by the
    kernel when the process ends, however it ends). Two agents on one site's state would
    both train and charge their local DP accountant for runs the ledger charges once."""
    import fcntl

    state_dir.mkdir(parents=True, exist_ok=True)
    fh = open(state_dir / "agent.lock", "a+")  # noqa: SIM115 (held until the process ends)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise StateDirBusy(f"another agent ({holder}) runs on the state directory {state_dir}; "
                           "stop it first, or give this one its own [site] state_dir") from exc
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}")
    fh.flush()
    return fh


def load_identity_key(path: Path) -> Ed25519PrivateKey:
    """The site's Ed25519 identity key: it signs every request and SecAgg+ advertisement."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def write_identity_key(path: Path) -> Ed25519PrivateKey:
    """A new identity key at `path`, mode 0600; FileExistsError if one is there already
    (a site that lost its key must be enrolled again, so it is never overwritten)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_atomic(Path(path), pem, mode=0o600, exclusive=True)
    return key


# ---------------------------------------------------------------- error-feedback residual


def load_residual(path: Path, dim: int) -> np.ndarray | None:
    """The residual saved after the site's last update; None if there is none or it is
    of another model's length."""
    if not path.exists():
        return None
    residual = np.load(path)
    return residual if residual.shape == (dim,) else None


def save_residual(path: Path, residual: np.ndarray | None) -> None:
    """Keep the residual for the next round (a round without error feedback has none)."""
    if residual is None:
        return
    buf = io.BytesIO()
    np.save(buf, residual)
    write_atomic(path, buf.getvalue())


# ---------------------------------------------------------------- agent state


class DurableState:
    """Small JSON state in the site's state dir (`agent-state.json`), replaced atomically.

    `joined`: the sessions this site fed an update (invariant 5). `unsettled`: DP runs the
    site's own accountant charged that the leader has not yet confirmed on the replicated
    ledger; they are reported with every request until it does, so that a run whose
    update died with its leader is still charged there (`wire.unsettled_run`).
    """

    MAX_UNSETTLED_KEPT = 100

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / STATE_FILE
        self.data: dict[str, Any] = {"joined": [], "unsettled": []}
        if self.path.exists():
            self.data.update(json.loads(self.path.read_text()))
        self._lock = threading.Lock()  # training threads record runs

    def joined(self, key: str) -> bool:
        return key in self.data["joined"]

    def mark_joined(self, key: str) -> None:
        with self._lock:
            self.data["joined"] = (self.data["joined"] + [key])[-1000:]
            self._save()

    def unsettled(self) -> list[dict[str, Any]]:
        """The newest runs to report, at most what the leader reads of one request."""
        with self._lock:
            return [dict(e) for e in self.data["unsettled"][-wire.MAX_UNSETTLED:]]

    def add_unsettled(self, run: dict[str, Any]) -> None:
        with self._lock:
            runs = [e for e in self.data["unsettled"]
                    if (e["round"], e["attempt"]) != (run["round"], run["attempt"])]
            if len(runs) >= self.MAX_UNSETTLED_KEPT:
                log.warning("forgetting unsettled DP run %s.%s: more than %d wait for the "
                            "ledger", runs[0]["round"], runs[0]["attempt"], self.MAX_UNSETTLED_KEPT)
            self.data["unsettled"] = [*runs, run][-self.MAX_UNSETTLED_KEPT:]
            self._save()

    def settle(self, answers: dict[tuple[int, int], str]) -> list[tuple[dict[str, Any], str]]:
        """Forget the runs the leader answered; returns them with the answers."""
        with self._lock:
            done = [(e, answers[(e["round"], e["attempt"])]) for e in self.data["unsettled"]
                    if (e["round"], e["attempt"]) in answers]
            if done:
                self.data["unsettled"] = [e for e in self.data["unsettled"]
                                          if (e["round"], e["attempt"]) not in answers]
                self._save()
            return done

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(self.data).encode())
