"""`fedraft demo --json` end to end: the figures issues 2-5 ask of it."""

import json
import subprocess
import sys

import pytest


def _demo() -> dict:
    out = subprocess.run([sys.executable, "-m", "coordinator", "demo", "--json"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_demo_json_meets_targets():
    result = _demo()
    # DP-SGD noise makes the final accuracy a random variable: for the demo's split and
    # settings it is 0.957 +- 0.007 over noise draws (simulations/bench_privacy.py, 8
    # draws, lowest 0.947), so one run must clear the target.
    assert result["final_accuracy"] >= 0.93, result["final_accuracy"]
    assert result["nodes"] == 3 and result["clients"] == 5
    assert result["rounds_completed"] >= 10
    assert result["leader_changes"] >= 1
    assert len(result["model_versions"]) == len(set(result["model_versions"])) >= 10
    assert result["nodes_agree"] is True
    assert result["audit_verified"] is True
    assert result["audit_charges_checked"] >= 10 * 5  # every site's charge, recomputed
    assert result["secure_aggregation"] is True
    assert 0 < result["upload_bytes_per_client"] < result["dense_bytes_per_client"]
    # every site took part and none spent past its budget
    assert len(result["epsilon_spent"]) == 5
    assert all(0 < eps <= result["epsilon_budget"] for eps in result["epsilon_spent"].values())
    assert result["seconds"] < 120
