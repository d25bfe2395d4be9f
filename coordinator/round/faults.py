"""Test-only fault injection: make the leader linger at a stage so a test can kill it there.

A file named by FEDRAFT_FAULT_HOLD holding `stage:seconds` holds whichever node leads at
that stage for that long; the file is re-read each time, so one cluster can be held at
each stage in turn. Unset in production, where every method is a no-op.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

FAULT_HOLD_ENV = "FEDRAFT_FAULT_HOLD"


class FaultHold:
    def __init__(self, path: str | None = None) -> None:
        self.path = path

    @classmethod
    def from_env(cls) -> FaultHold:
        return cls(os.environ.get(FAULT_HOLD_ENV))

    def spec(self) -> tuple[str, float] | None:
        """(stage, seconds) from the file, or None (unset, unreadable or empty)."""
        if not self.path:
            return None
        try:
            stage, _, seconds = Path(self.path).read_text().strip().partition(":")
            return stage, float(seconds)
        except (OSError, ValueError):
            return None

    def hold(self, stage: str, still_leading: Callable[[], bool]) -> None:
        """Stay at `stage` for the configured seconds while this node leads."""
        spec = self.spec()
        if spec is None or spec[0] != stage:
            return
        log.warning("fault injection: holding at %s for %.1fs", stage, spec[1])
        deadline = time.monotonic() + spec[1]
        while time.monotonic() < deadline and still_leading():
            time.sleep(0.05)

    def holding(self, stage: str, stage_opened: float) -> bool:
        """Whether a stage that opened at `stage_opened` (monotonic) must stay open yet."""
        spec = self.spec()
        return spec is not None and spec[0] == stage and time.monotonic() < stage_opened + spec[1]
