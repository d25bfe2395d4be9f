"""A full disk stops a node taking work, with a clear error; it resumes when space returns.

pysyncobj grows its journal through mmap: on a full disk the kernel has no block behind a
page and the node died of SIGBUS. `raft_patches.reserve_journal_space` turns that into an
ENOSPC error; this watch keeps the node from getting there. Below `min_free` bytes free
on its data directory the node refuses writes (admin commands, site submissions, blobs)
with `disk_full`, takes no Raft append or vote, hands leadership away and starts no round;
at `resume_free` it takes work again. The gap between the two keeps it from flapping.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

MIB = 1024 * 1024


def still_full(free: int, was_full: bool, min_free: int, resume_free: int) -> bool:
    """Whether the disk counts as full now: below `min_free`, or still below
    `resume_free` after it was full."""
    return free < (resume_free if was_full else min_free)


class DiskWatch:
    """Samples the free space under `path`; `full()` is read by the API, the driver and
    the Raft patches, `on_change(full)` hears each change."""

    def __init__(self, path: Path, min_free: int = 256 * MIB, resume_free: int = 512 * MIB,
                 free_bytes: Callable[[Path], int] | None = None,
                 on_change: Callable[[bool], None] | None = None) -> None:
        if not 0 <= min_free <= resume_free:
            raise ValueError("min_free must be at most resume_free")
        self.path = path
        self.min_free, self.resume_free = min_free, resume_free
        self._free_bytes = free_bytes or _statvfs_free
        self._on_change = on_change
        self._full = False
        self.free = -1

    def full(self) -> bool:
        return self._full

    def reason(self) -> str:
        return (f"the disk holding {self.path} has {self.free // MIB} MiB free (the node "
                f"takes work again at {self.resume_free // MIB} MiB)")

    def check(self) -> bool:
        """Sample once; returns whether the disk counts as full."""
        try:
            self.free = self._free_bytes(self.path)
        except OSError as exc:
            log.warning("cannot read free space of %s: %s", self.path, exc)
            return self._full
        full = still_full(self.free, self._full, self.min_free, self.resume_free)
        if full != self._full:
            self._full = full
            if full:
                log.error("disk full: %s; refusing new work", self.reason(),
                          extra={"event": "disk_full", "free_bytes": self.free})
            else:
                log.warning("disk space is back (%d MiB free under %s): taking work again",
                            self.free // MIB, self.path,
                            extra={"event": "disk_resumed", "free_bytes": self.free})
            if self._on_change is not None:
                self._on_change(full)
        return full

    def run(self, stopping: threading.Event, every: float = 1.0) -> None:
        while not stopping.wait(every):
            self.check()


def _statvfs_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
