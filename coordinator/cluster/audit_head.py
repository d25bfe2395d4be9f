"""The leader commits its signed audit head through Raft, so no one database holds the
only record of how long the log is.

Every node writes the same audit entries into its own SQL database; anyone who can write
to a database could delete its tail (and the checkpoint rows above it) and the rest would
still verify. The head the leader signs after its writes is committed to the replicated
state, where every node's journal holds a copy; `fedraft cluster audit-head` reads it and
`fedraft audit verify --head` checks a database or an export against it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from coordinator.cluster.replica import CommandFailed, Replica
from coordinator.core import commands

log = logging.getLogger(__name__)

PUBLISH_EVERY_S = 2.0
"""At most one head per interval: a round writes a few entries within a second or two."""


class AuditHeadPublisher:
    """On the leader, commits the newest head its audit writer signed whenever it covers
    more entries than the committed one."""

    def __init__(self, replica: Replica, latest: Callable[[], dict[str, Any] | None],
                 interval: float = PUBLISH_EVERY_S) -> None:
        """`latest()` is the newest signed head of this node's log (a checkpoint's plain
        form), or None before the first entry."""
        self._replica = replica
        self._latest = latest
        self._interval = interval

    def committed_size(self) -> int:
        head = self._replica.state.read(lambda s: s.get("audit_head"))
        return head["tree_size"] if head else 0

    def run(self, stopping: threading.Event) -> None:
        """Publish until `stopping` is set, one attempt per interval at most."""
        while not stopping.wait(self._interval):
            try:
                self.publish_once()
            except Exception:  # never let a surprise end the thread: the next try may work
                log.exception("audit head publishing failed")

    def publish_once(self) -> bool:
        """Commit the latest head if this node leads and it is newer; whether it did."""
        head = self._latest()
        if head is None or not self._replica.is_leader() or head["tree_size"] <= self.committed_size():
            return False
        try:
            result = self._replica.submit(commands.audit_head(head), timeout=5.0)
        except CommandFailed as exc:
            log.warning("audit head %d not committed: %s", head["tree_size"], exc)
            return False
        if not result.get("ok") and result.get("code") != "stale":
            log.warning("audit head %d refused: %s", head["tree_size"], result.get("error"))
        return bool(result.get("ok"))
