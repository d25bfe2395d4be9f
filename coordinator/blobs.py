"""Content-addressed blob store: model versions live here, never in the Raft log.

A blob's name is the sha256 of its bytes, so any node can serve it and any reader can
check it. Writes go to a temporary file, are fsynced, then renamed into place, so a
crash leaves either the whole blob or nothing.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from coordinator.wire import HEX64_CHARS, sha256_hex


class BlobError(Exception):
    pass


class BlobStore:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, digest: str) -> Path:
        if len(digest) != 64 or not set(digest) <= HEX64_CHARS:
            raise BlobError(f"not a sha256 hex digest: {digest[:80]!r}")
        return self.directory / digest

    def has(self, digest: str) -> bool:
        return self._path(digest).exists()

    def put(self, data: bytes, expected: str | None = None) -> str:
        digest = sha256_hex(data)
        if expected is not None and expected != digest:
            raise BlobError(f"content hashes to {digest}, not {expected}")
        path = self._path(digest)
        if path.exists():
            return digest
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return digest

    def get(self, digest: str) -> bytes:
        """The blob's bytes, checked against its name (a corrupt file is an error)."""
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobError(f"no blob {digest}") from None
        if sha256_hex(data) != digest:
            raise BlobError(f"blob {digest} is corrupt on disk")
        return data

    def size(self, digest: str) -> int:
        return self._path(digest).stat().st_size
