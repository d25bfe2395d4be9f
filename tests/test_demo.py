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
    # DP-SGD noise makes the final accuracy a random variable: 12 demo runs on this
    # machine (stop 21) ended between 0.938 and 0.965 (mean 0.951; 113 test records, so
    # one record is 0.9 points); one CI run ended at 0.920. The message says which rounds
    # and participants led there, should it happen again.
    assert result["final_accuracy"] >= 0.93, [
        (r["round"], r["attempt"], r["participants"], r["accuracy"]) for r in result["rounds"]]
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
