"""One hostile site among six real agents under SecAgg+ is found and quarantined.

Runs `simulations/hostile_sites.py` (real nodes and agents; the hostile one sends the
largest values with zero weight) as a subprocess, then reads the verdict. The pure parts
(the bound, the search) are in `test_hostile.py`. About a minute on 2 cores.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_hostile_site_is_quarantined_within_the_bound():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "simulations" / "hostile_sites.py"), "--sites", "6",
         "--rounds", "3", "--kinds", "max_zero_weight", "--no-baseline", "--json"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (case,) = json.loads(proc.stdout.strip().splitlines()[-1])["cases"]
    assert case["quarantined_site"] == "site-03"
    assert 1 <= case["attempts_lost"] <= math.ceil(math.log2(6)) + 2
