"""`fedraft demo --json` end to end: the figures issue 2 asks of it."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_json_meets_targets():
    out = subprocess.run([sys.executable, "-m", "coordinator", "demo", "--json"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["nodes"] == 3 and result["clients"] == 5
    assert result["rounds_completed"] >= 10
    assert result["final_accuracy"] >= 0.93
    assert result["leader_changes"] >= 1
    assert len(result["model_versions"]) == len(set(result["model_versions"])) >= 10
    assert result["nodes_agree"] is True
    # the issue asks for under 2 minutes on a quiet machine; this guards against hangs on a
    # loaded one (the figure is reported, see the closing note)
    assert result["seconds"] < 900
