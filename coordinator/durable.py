"""Atomic, durable file writes on the coordinator side: the one helper every writer uses.

A reader sees the old file or the new one, never a torn one, even across a power cut:
the bytes go to a temporary file in the same directory, are fsynced, renamed into place,
and the directory is fsynced so the rename itself survives. (The site agent has its own,
`client.store.write_atomic`: the two sides share only the wire schema.)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def fsync_dir(directory: Path | str) -> None:
    """Make a rename or a new file in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path | str, data: bytes | Iterable[bytes], mode: int | None = None) -> None:
    """Replace `path` with `data` (bytes, or chunks streamed in order) atomically and
    durably; `mode` sets the file's permissions before it appears under its name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
                fh.write(chunk)
            fh.flush()
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
