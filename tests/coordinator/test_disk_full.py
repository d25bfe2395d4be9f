"""A full disk: the journal fails with ENOSPC instead of killing the node with SIGBUS, and
the node stops taking work until space returns.

The journal test runs a one-node replica in a child process whose data directory is a
6 MiB tmpfs mounted in a mount namespace of its own (`unshare`, root only).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from coordinator import api
from coordinator.cluster.config import NodeAddress
from coordinator.cluster.disk import MIB, DiskWatch, still_full

ROOT = Path(__file__).resolve().parents[2]


def test_the_watch_has_hysteresis_and_says_why() -> None:
    assert not still_full(300 * MIB, False, 256 * MIB, 512 * MIB)
    assert still_full(200 * MIB, False, 256 * MIB, 512 * MIB)
    assert still_full(300 * MIB, True, 256 * MIB, 512 * MIB)  # not yet back
    assert not still_full(600 * MIB, True, 256 * MIB, 512 * MIB)
    free = [1000 * MIB]
    changes: list[bool] = []
    watch = DiskWatch(Path("/data"), 256 * MIB, 512 * MIB, free_bytes=lambda _: free[0],
                      on_change=changes.append)
    for f in (1000, 100, 300, 400, 600, 600):
        free[0] = f * MIB
        watch.check()
    assert changes == [True, False]
    free[0] = 10 * MIB
    assert watch.check() and "10 MiB free" in watch.reason()


def test_a_node_with_a_full_disk_refuses_writes_but_not_reads() -> None:
    reason: list[str | None] = [None]
    node = api.NodeApi(NodeAddress("n1", "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"),
                       *([None] * 7), disk_full=lambda: reason[0])  # type: ignore[arg-type]
    handler = node._writing(lambda msg, caller: {"ok": True})
    assert handler({}, None) == {"ok": True}  # type: ignore[arg-type]
    reason[0] = "the disk holding /data has 3 MiB free"
    refused = handler({}, None)  # type: ignore[arg-type]
    assert refused["ok"] is False and refused["code"] == "disk_full"
    assert "3 MiB free" in refused["error"]


CHILD = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from coordinator.cluster.replica import CommandFailed, Replica
    from coordinator.cluster.journal_check import check_raft_dir
    from coordinator.demo.cluster import free_ports

    root = Path(sys.argv[1])
    filler = root / "filler"
    filler.write_bytes(b"\\0" * (3 * 1024 * 1024))
    r = Replica(f"127.0.0.1:{free_ports(1)[0]}", [], root / "raft", "x" * 24, (0.2, 0.4),
                on_applied=lambda *_: None)
    while not r.is_leader():
        time.sleep(0.05)
    done, failed = 0, None
    for i in range(200):
        try:
            r.submit({"op": "barrier", "pad": "p" * 40000}, timeout=2.0)
            done += 1
        except CommandFailed as exc:
            failed = str(exc)
            break
    filler.unlink()  # space returns
    time.sleep(0.5)
    after = r.submit({"op": "barrier", "pad": "q"}, timeout=10.0)["ok"]
    r.sync.destroy_synchronous()
    check_raft_dir(root / "raft" / "raft.journal")
    print(json.dumps({"done": done, "failed": failed, "after": after}))
""")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare for a private tmpfs")
def test_a_full_disk_fails_the_append_and_never_kills_the_node(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c",
         f"mount -t tmpfs -o size=6m tmpfs {mount} && exec {sys.executable} {script} {mount}"],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])  # -7 was SIGBUS
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["done"] >= 10 and result["failed"] is not None  # it filled, then refused
    assert result["after"] is True  # and wrote again once space returned
