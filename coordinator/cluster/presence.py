"""Who is polling this node, and a doorbell for sites waiting on a long poll.

Both are leader-side memory, rebuilt from scratch after a leader change and never
replicated: which sites polled recently decides who can be sampled, and the doorbell
wakes long polls when a round opens, a stage closes or a leader claims its term.
"""

from __future__ import annotations

import threading
import time


class OnlineSites:
    """Sites that polled this node recently; only the leader's view is used."""

    def __init__(self, window_s: float = 8.0) -> None:
        self.window_s = window_s
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def touch(self, site: str) -> None:
        with self._lock:
            self._seen[site] = time.monotonic()

    def online(self) -> set[str]:
        cutoff = time.monotonic() - self.window_s
        with self._lock:
            return {s for s, t in self._seen.items() if t >= cutoff}


class TaskBell:
    """Rings when the tasks sites may get could have changed; long polls wait on it."""

    def __init__(self) -> None:
        self._changed = threading.Condition()

    def ring(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait(self, timeout: float) -> None:
        with self._changed:
            self._changed.wait(timeout)
