"""The agent's durable record of DP runs its accountant charged and the ledger has not yet
confirmed (issue 4), and the wire schema the leader reads them with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.store import DurableState
from coordinator import wire


def _run(rnd: int, attempt: int = 1) -> dict:
    return {"round": rnd, "attempt": attempt, "term": 3, "noise_multiplier": 1.2,
            "sample_rate": 0.125, "steps": 8.0, "clip_norm": 1.0, "delta": 1e-5}


def test_unsettled_runs_survive_a_restart_and_settle(tmp_path: Path) -> None:
    state = DurableState(tmp_path)
    for r in range(1, 26):
        state.add_unsettled(_run(r))
    state.add_unsettled({**_run(25), "steps": 16.0})  # the same attempt again: replaced
    again = DurableState(tmp_path)  # what a restarted agent reads
    sent = again.unsettled()
    assert len(sent) == wire.MAX_UNSETTLED and [e["round"] for e in sent] == list(range(6, 26))
    assert sent[-1]["steps"] == 16.0
    done = again.settle({(25, 1): "charged", (24, 1): "uncharged", (99, 1): "charged"})
    assert [(e["round"], status) for e, status in done] == [(24, "uncharged"), (25, "charged")]
    assert [e["round"] for e in DurableState(tmp_path).unsettled()][-1] == 23


def test_state_written_before_unsettled_runs_loads(tmp_path: Path) -> None:
    (tmp_path / "agent-state.json").write_text(json.dumps({"joined": ["1.1.1"]}))
    state = DurableState(tmp_path)
    assert state.joined("1.1.1") and state.unsettled() == []


def test_unsettled_run_schema() -> None:
    assert wire.unsettled_run(_run(2)) == _run(2)
    assert wire.unsettled_run({**_run(2), "steps": 8}) == _run(2)  # ints read as floats


@pytest.mark.parametrize("change", [
    {"round": "2"}, {"attempt": True}, {"term": -1}, {"noise_multiplier": 0.0},
    {"sample_rate": 1.5}, {"steps": 7.5}, {"clip_norm": float("nan")}, {"delta": 1.0},
    {"steps": None},
])
def test_unsettled_run_refuses_what_the_ledger_cannot_charge(change: dict) -> None:
    assert wire.unsettled_run({**_run(2), **change}) is None
