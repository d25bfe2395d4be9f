"""The state stays bounded by the federation, not its age (issue 16): a window of round
history, status replies that page through it, and the blobs the retention policy keeps."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator import wire
from coordinator.cluster import snapshot
from coordinator.core import commands as cmds
from coordinator.core import state as sm
from coordinator.core.queries import (
    HISTORY_ROUNDS,
    KEEP_VERSIONS,
    retained_versions,
    round_window,
)

SITES = ["site-a", "site-b"]


def _h(i: int) -> str:
    return hashlib.sha256(f"v{i}".encode()).hexdigest()


def _ok(state: dict, command: dict) -> None:
    assert sm.apply(state, command)["ok"], command["op"]


def _run(rounds: int) -> dict:
    state = sm.initial_state()
    for site in SITES:
        _ok(state, cmds.enroll(site, wire.public_key_hex(Ed25519PrivateKey.generate())))
    _ok(state, cmds.claim(1, "n1"))
    _ok(state, cmds.genesis(_h(0), 10, ["n1"], 1))
    _ok(state, {**cmds.train(rounds, {"clients": 2, "min_clients": 2}), "submitted_term": 1})
    for rnd in range(1, rounds + 1):
        _ok(state, cmds.round_open(1, rnd, 1, _h(rnd - 1), SITES, "s" * 16))
        _ok(state, cmds.round_commit(1, rnd, 1, node="n1", version=_h(rnd), parent=_h(rnd - 1),
                                     size=10, survivors=SITES, metrics={"loss": 1.0},
                                     holders=["n1"], cluster_size=1, charges={}))
    return state


LONG = _run(HISTORY_ROUNDS + 40)


def test_the_state_keeps_a_window_of_round_history_and_every_version() -> None:
    last = HISTORY_ROUNDS + 40
    assert len(LONG["versions"]) == last + 1  # the chain itself stays whole
    assert sorted(LONG["history"]) == list(range(41, last + 1))
    assert sorted(LONG["attempts"]) == list(range(41, last + 1))
    # an attempt of a forgotten round takes no late charge: it is named, not guessed at
    result = sm.apply(LONG, {**cmds.late_charge(1, 3, 1, "site-a", 0, {}), "submitted_term": 1})
    assert result["code"] == "not_aborted"


def _size(obj: object) -> int:
    return len(wire.pack({"o": obj}))


@settings(max_examples=25, deadline=None)
@given(budget=st.integers(min_value=1, max_value=20_000), start=st.integers(0, 60))
def test_status_pages_cover_each_round_once_in_order(budget: int, start: int) -> None:
    state = _run(60)
    seen: list[int] = []
    cursor = start
    while True:
        page = round_window(state, cursor, budget, _size)
        if page["rounds_from"] is None:
            break
        rounds = list(range(page["rounds_from"], page["rounds_to"] + 1))
        assert [v["round"] for v in page["versions"]] == rounds
        assert sorted(map(int, page["history"])) == [r for r in rounds if r in state["history"]]
        if len(rounds) > 1:
            assert _size([page["versions"], page["history"]]) <= budget + 100 * len(rounds)
        seen += rounds
        if page["rounds_to"] >= 60:
            break
        cursor = page["rounds_to"] + 1
    assert seen == list(range(start, 61))


def test_the_default_window_is_the_newest_rounds_and_stays_small() -> None:
    page = round_window(LONG, None, 48 * 1024, _size)
    assert page["rounds_to"] == HISTORY_ROUNDS + 40
    assert _size(page) < 64 * 1024


def test_blob_retention_keeps_the_newest_versions_the_runs_and_the_first() -> None:
    keep = retained_versions(LONG)
    last = HISTORY_ROUNDS + 40
    assert {_h(r) for r in range(last - KEEP_VERSIONS + 1, last + 1)} <= keep
    assert _h(0) in keep  # the first genesis, the run's base
    assert _h(5) not in keep and len(keep) == KEEP_VERSIONS + 1


def test_a_long_runs_state_is_plain_data_a_snapshot_keeps_exactly() -> None:
    snap = snapshot.Snapshot(LONG, (b"x", 2, 1), (b"y", 1, 1), set())
    assert snapshot.decode(snapshot.encode(snap)).machine == LONG
