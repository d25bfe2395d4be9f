"""A newcomer's first hour, literally: the README's "Running a real cluster" commands for
one machine (127.0.0.1), run from a shell.

Certificates, three `fedraft node start`, enrollment bundles, three `fedraft-client`
processes hosting the shipped `flwr new`-style app on three partitions, a 5-round run,
a second run stopped mid-way, `audit verify` and `audit serve`. The block leaves every
process's pid in `pids`; the test ends those (and only those) when it is done.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- newcomer:begin -->", 1)[1].split("<!-- newcomer:end -->", 1)[0]
    return block.split("```bash\n", 1)[1].rsplit("```", 1)[0]


def _end(pids_file: Path) -> None:
    for line in pids_file.read_text().split() if pids_file.exists() else []:
        try:
            os.kill(int(line), signal.SIGTERM)
        except ProcessLookupError:
            pass


def test_the_readme_one_machine_block_runs_as_written(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for name in ("FEDRAFT_ADMIN", "FEDRAFT_CA", "FEDRAFT_CERT", "FEDRAFT_KEY", "FEDRAFT_CONFIG",
                 "FEDRAFT_AUDIT_DB", "PYTHONPATH"):
        env.pop(name, None)
    script = "set -euo pipefail\n" + _readme_block()
    try:
        out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=540)
    finally:
        work = sorted(tmp_path.glob("tmp.*"))  # what `mktemp -d` made
        for w in work:
            _end(w / "pids")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert len(work) == 1
    w = work[0]
    # the first run: 5 rounds committed, its final model evaluated by all three sites
    first = json.loads((w / "first.json").read_text())
    assert first["status"] == "completed" and first["rounds_committed"] == 5
    assert [r["status"] for r in first["round_rows"]] == ["committed"] * 5
    final = first["final_evaluation"]
    assert sorted(final["site_metrics"]) == ["site-0", "site-1", "site-2"]
    assert final["version"] == first["final_version"]
    untrained = first["round_rows"][0]["metrics"]["base_accuracy"]  # the genesis model's
    assert final["metrics"]["eval_accuracy"] > untrained + 0.1, (untrained, final)
    assert all(r["metrics"]["survivors"] >= 2 for r in first["round_rows"])
    # each site trained on its own partition: what they report differs
    losses = {m["eval_loss"] for m in final["site_metrics"].values()}
    assert len(losses) == 3
    # the second run, stopped by the operator with the reason
    stop = json.loads((w / "stop.json").read_text())
    assert stop["run"] == "second" and stop["operator"] == "alice"
    lines = out.stdout.splitlines()
    assert any(re.search(r"\bfirst\b.*\bcompleted\b", x) for x in lines), out.stdout
    assert any(re.search(r"\bsecond\b.*\bstopped\b", x) for x in lines), out.stdout
    # the auditor: a verified log under the pinned key, the console agrees with the CLI
    verify = json.loads((w / "verify.json").read_text())
    assert verify["ok"] is True and verify["signer_pinned"] is True
    rounds = json.loads((w / "rounds.json").read_text())
    assert json.loads((w / "console-rounds.json").read_text()) == rounds
    assert sum(r["status"] == "committed" for r in rounds) >= 6  # 5, and the second run's
