"""Short chaos run: 50 random faults (SIGKILL leader/follower/all, SIGSTOP leader) while
real sites train (two of them with DP-SGD under a budget), an admin writer streams
acknowledged enrollments, and the nodes compact their journals every 100 entries.

Runs `simulations/chaos.py` as a subprocess so its node and site processes, and any it
leaves behind on failure, belong to that run alone. About 5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_chaos_short(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "simulations" / "chaos.py"),
            "--trials",
            "50",
            # the nodes compact their journals every 100 entries, so the faults also land
            # around snapshots and trims (simulations/README.md: the crash-point run)
            "--snapshot-entries",
            "100",
            "--json",
            "--quiet",
            "--root",
            str(tmp_path / "cluster"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"chaos.py printed nothing; stderr:\n{proc.stderr[-4000:]}"
    result = json.loads(lines[-1])
    report = "\n".join(lines[:-1]) + "\n" + proc.stderr[-4000:]
    assert result["stuck"] is None, report
    assert result["trials"] == 50, report
    assert result["acknowledged_lost"] == 0, report
    assert result["repeated_versions"] == 0, report
    assert result["versions_lost"] == 0, report
    assert result["overspend"] == 0, report
    assert result["overspend_checked"], report
    assert result["rounds_committed"] > 0, report
    assert result["audit_damaged"] == [], report
    assert result["snapshots"] > 0, report
