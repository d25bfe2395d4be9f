"""The child processes of a fault simulation's nodes, and ending those that outlive them.

Shared by `chaos.py` and `bench_failover.py`, which SIGKILL nodes and must end, by pid,
only processes their own cluster started."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from coordinator.demo.cluster import LocalCluster


def _stat_fields(stat: str) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces): state, ppid, ..."""
    return stat[stat.rindex(")") + 2 :].split()


def descendants(pid: int) -> set[int]:
    """Processes below `pid` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        children.setdefault(int(_stat_fields(stat)[1]), []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def node_children(cluster: LocalCluster, node_ids: list[str]) -> set[int]:
    kids: set[int] = set()
    for node_id in node_ids:
        popen = cluster.node_procs[node_id].popen
        if popen is not None and popen.poll() is None:
            kids |= descendants(popen.pid)
    return kids


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited child of a dead node waits, unreaped, for init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return _stat_fields(stat)[0] != "Z"


def end_orphans(kids: set[int], orphans: list[int], grace: float = 1.0) -> None:
    """End, by pid, the processes of dead nodes still running `grace` seconds later.

    A node's children end with it: its privacy-charge workers get SIGTERM when it goes
    (coordinator/lifeline.py), multiprocessing's resource tracker exits when its pipe
    closes. One still running after the grace period is a leak; it is ended and its pid
    goes to `orphans`, which the reports count. Zombies are not counted: they hold no
    memory and only wait for init to reap them.
    """
    deadline = time.monotonic() + grace
    while any(_running(pid) for pid in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in sorted(kids):
        if not _running(pid):
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        orphans.append(pid)


def sigkill_node(cluster: LocalCluster, node_id: str, orphans: list[int]) -> None:
    kids = node_children(cluster, [node_id])
    cluster.kill_node(node_id, signal.SIGKILL)
    end_orphans(kids, orphans)


def stop_cluster(cluster: LocalCluster, orphans: list[int]) -> None:
    kids = node_children(cluster, list(cluster.node_procs))
    cluster.stop()
    end_orphans(kids, orphans)
