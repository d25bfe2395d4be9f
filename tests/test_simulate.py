"""The Ray simulation engine: virtual sites on Ray actors against a real 3-node cluster.

Runs `simulations/simulate.py` as a subprocess (its nodes, Ray's processes and the actors
are ended by it: `ray.shutdown()` and the cluster's stop, by pid), and checks that Ray
stays optional: no module of the node or the agent imports it.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIMULATE = ROOT / "simulations" / "simulate.py"


def test_fifty_virtual_sites_run_rounds_through_local_ray() -> None:
    """50 sites on local Ray training digits with DP-SGD (epsilon 8 each), 20 sampled per
    round, 2 rounds: each round commits with 20 participants and 20 survivors, the sites'
    own agents saw 20 updates taken, and the ledger charged them within their budget."""
    pytest.importorskip("ray", reason="the simulation needs Ray: pip install -e '.[sim]'")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, str(SIMULATE), "--sites", "50", "--per-round", "20", "--rounds", "2",
         "--online", "50", "--min-clients", "20", "--actors", "2", "--settle", "3",
         "--task", "digits_small", "--epsilon", "8",
         "--timeout", "240", "--json"],
        capture_output=True, text=True, timeout=420, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rounds_committed"] == 2
    assert [(r["participants"], r["survivors"]) for r in result["round_rows"]] == [(20, 20)] * 2
    rounds = [str(r["round"]) for r in result["round_rows"]]
    assert result["accepted"] == {r: 20 for r in rounds}  # what the virtual agents saw
    assert result["host_counts"].get("errors", 0) == 0
    assert result["online_on_leader"] == 50
    assert 20 <= result["sites_charged"] <= 40  # DP-SGD ran, and the leader charged it
    assert 0 < result["max_epsilon_spent"] <= 8
    assert result["peak_rss_mb"] > 0 and result["idle_site_kb"] > 0


def test_without_ray_the_simulation_says_how_to_get_it() -> None:
    """No Ray: one line naming the extra, exit 2 (`sys.modules['ray'] = None` is how
    Python refuses an import)."""
    code = ("import runpy, sys; sys.modules['ray'] = None; "
            f"sys.argv = ['simulate.py', '--sites', '10']; runpy.run_path({str(SIMULATE)!r}, "
            "run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fedraft simulate needs Ray: pip install -e '.[sim]'"


def test_the_node_and_the_agent_never_import_ray() -> None:
    """Ray is the simulation's extra: no module under coordinator/ or client/ names it,
    and the agent's and node's modules load without it."""
    named = []
    for package in ("coordinator", "client", "privacy"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                named += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names
                          if n.split(".")[0] == "ray"]
    assert named == []
    code = ("import sys, client.agent, client.virtual_sites, coordinator.node, coordinator.cli; "
            "assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=ROOT)
