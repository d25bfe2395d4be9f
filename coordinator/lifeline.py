"""Children of a launcher (demo, tests) die with it, without an unsafe ``preexec_fn``.

A ``preexec_fn`` runs Python between fork and exec in a copy of a multi-threaded
process (gRPC threads, import lock): it can deadlock the child. Instead the launcher
names itself in ``FEDRAFT_PARENT_PID`` and the child, once started, asks the kernel for
SIGTERM when that parent goes (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import os
import signal

PARENT_ENV = "FEDRAFT_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def child_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` plus this process as the parent its children must not outlive."""
    return {**env, PARENT_ENV: str(os.getpid())}


def bind_to_parent() -> None:
    """If launched by a fedraft launcher, exit when it dies (also if it already has)."""
    wanted = os.environ.pop(PARENT_ENV, None)
    if not wanted or not wanted.isdigit():
        return
    die_with_parent(int(wanted))


def die_with_parent(parent_pid: int) -> None:
    """SIGTERM this process when `parent_pid` (its parent) dies; a node's worker pools use
    it so a SIGKILLed node leaves no orphans."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the prctl took hold
        os._exit(1)
