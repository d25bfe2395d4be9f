"""The round driver's decisions, without a network, a clock or a node."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from coordinator.core.queries import eligible_sites
from coordinator.core.round_config import DEFAULT_ROUND_CONFIG, RoundConfig
from coordinator.core.state import apply, initial_state
from coordinator.round import policy

CONFIG = RoundConfig.from_mapping(DEFAULT_ROUND_CONFIG)


def _config(**changes: object) -> RoundConfig:
    return RoundConfig.from_mapping({**DEFAULT_ROUND_CONFIG, **changes})


def test_leader_view_reads_the_next_attempt_and_the_run() -> None:
    s = initial_state()
    assert apply(s, {"op": "enroll", "site": "a", "public_key": "a" * 64})["ok"]
    assert apply(s, {"op": "enroll", "site": "b", "public_key": "b" * 64})["ok"]
    assert apply(s, {"op": "revoke", "site": "b"})["ok"]
    assert apply(s, {"op": "genesis", "version": "0" * 64, "size": 1, "holders": ["n1"],
                     "cluster_size": 1})["ok"]
    assert apply(s, {"op": "train", "rounds": 3, "config": {
        "lr": 0.2, "min_clients": 1, "secure_aggregation": False}})["ok"]
    view = policy.LeaderView.of(s)
    assert view.pending and view.last_round == 0 and view.run == (1, 3)
    assert eligible_sites(s) == ["a"] and view.genesis == view.head == "0" * 64
    assert view.config.lr == 0.2 and policy.next_attempt(view) == (1, 1)
    assert apply(s, {"op": "claim", "term": 2, "node": "n1"})["ok"]
    busy = apply(s, {"op": "train", "rounds": 1, "config": {"min_clients": 1}})
    assert busy["code"] == "run_active" and "run-1 is still running" in busy["error"]
    assert apply(s, {"op": "round_open", "term": 2, "round": 1, "attempt": 1, "base": "0" * 64,
                     "participants": ["a"], "seed": "00"})["ok"]
    assert apply(s, {"op": "round_abort", "term": 2, "round": 1, "attempt": 1,
                     "reason": "x"})["ok"]
    assert policy.next_attempt(policy.LeaderView.of(s)) == (1, 2)


def _failing(s: dict, attempts: int, term: int = 2) -> None:
    first = s["attempts"].get(1, 0) + 1
    for a in range(first, first + attempts):
        assert apply(s, {"op": "round_open", "term": term, "round": 1, "attempt": a,
                         "base": "0" * 64, "participants": ["a"], "seed": "00"})["ok"]
        assert apply(s, {"op": "round_abort", "term": term, "round": 1, "attempt": a,
                         "reason": f"too_few_updates (0/1) #{a}"})["ok"]


def test_a_run_stops_after_max_attempts_failed_in_a_row_and_says_why() -> None:
    s = initial_state()
    assert apply(s, {"op": "enroll", "site": "a", "public_key": "a" * 64})["ok"]
    assert apply(s, {"op": "genesis", "version": "0" * 64, "size": 1, "holders": ["n1"],
                     "cluster_size": 1})["ok"]
    refused = apply(s, {"op": "train", "rounds": 2, "config": {"min_clients": 2}})
    assert refused["code"] == "unsatisfiable" and "only 1 sites can take part" in refused["error"]
    assert apply(s, {"op": "claim", "term": 2, "node": "n1"})["ok"]
    config = {"min_clients": 1, "secure_aggregation": False, "max_attempts": 3}
    assert apply(s, {"op": "train", "rounds": 2, "config": config})["ok"]
    _failing(s, 2)
    assert policy.give_up(policy.LeaderView.of(s)) is None
    _failing(s, 1)
    reason = policy.give_up(policy.LeaderView.of(s))
    assert reason == ("round 1 failed 3 attempts in a row (max_attempts 3); the last: "
                      "too_few_updates (0/1) #3")
    stopped = apply(s, {"op": "stop", "reason": reason, "node": "n1"})
    assert stopped["ok"] and stopped["node"] == "n1" and stopped["target_round"] == 0
    assert not policy.LeaderView.of(s).pending
    # a new run starts counting afresh, though round 1 already has 3 failed attempts
    assert apply(s, {"op": "train", "rounds": 1, "config": config})["ok"]
    assert "stopped" not in s["training"]
    assert policy.give_up(policy.LeaderView.of(s)) is None
    _failing(s, 3)
    assert policy.give_up(policy.LeaderView.of(s)) is not None
    assert apply(s, {"op": "stop", "node": "n1"})["ok"]
    # 0: retry for ever, as before
    assert apply(s, {"op": "train", "rounds": 1, "config": {"max_attempts": 0}})["ok"]
    _failing(s, 30)
    assert policy.give_up(policy.LeaderView.of(s)) is None


def test_a_round_that_cannot_even_be_sampled_stops_the_run_too() -> None:
    assert policy.cannot_sample((0, 0, ""), 1, 3) is None
    assert policy.cannot_sample((1, 2, "only 1 of 3 online"), 1, 3) is None
    assert policy.cannot_sample((1, 3, "only 1 of 3 online"), 2, 3) is None  # another round
    assert policy.cannot_sample((1, 3, "only 1 of 3 online"), 1, 0) is None  # never
    assert policy.cannot_sample((1, 3, "only 1 of 3 online"), 1, 3) == (
        "round 1 could not start 3 times in a row; the last: only 1 of 3 online")


@given(st.integers(0, 50), st.integers(1, 20), st.integers(1, 20), st.booleans())
def test_sampling_waits_for_enough_sites_then_gives_up(online: int, want: int, least: int,
                                                       late: bool) -> None:
    decision = policy.sampling(online, want, least, late)
    if online >= want:
        assert decision == "sample"
    elif late:
        assert decision == ("sample" if online >= least else "give_up")
    else:
        assert decision == "wait"


def test_sample_size_and_choice() -> None:
    assert policy.sample_size(_config(clients=3, min_clients=2), 10) == 3
    assert policy.sample_size(_config(fraction=0.5, min_clients=2), 9) == 5
    assert policy.sample_size(_config(fraction=0.1, min_clients=2), 9) == 2  # never below min
    assert policy.sample_size(_config(clients=8, min_clients=2), 5) == 5  # never above eligible
    chosen = policy.choose({"d", "a", "c", "b"}, 2, random.Random(1))
    assert len(chosen) == 2 and chosen == sorted(chosen) and set(chosen) <= {"a", "b", "c", "d"}
    assert policy.choose({"a"}, 3, random.Random(1)) == ["a"]


def test_stage_timeouts_and_when_a_stage_is_done() -> None:
    cfg = _config(collect_timeout_s=60.0, stage_timeout_s=20.0)
    assert policy.stage_timeout("collect", cfg) == policy.stage_timeout("masked", cfg) == 60.0
    assert policy.stage_timeout("advertise", cfg) == policy.stage_timeout("unmask", cfg) == 20.0
    everyone = frozenset({"a", "b"})
    assert policy.stage_done({"a", "b"}, everyone, holding=False, now=1.0, deadline=5.0)
    assert not policy.stage_done({"a", "b"}, everyone, holding=True, now=1.0, deadline=5.0)
    assert not policy.stage_done({"a"}, everyone, holding=False, now=1.0, deadline=5.0)
    assert policy.stage_done({"a"}, everyone, holding=True, now=6.0, deadline=5.0)


def test_abort_reasons() -> None:
    assert policy.too_few(["a"], 2) == "too_few_updates (1/2)"
    assert policy.too_few(["a", "b"], 2) is None
    assert policy.stale_round_reason({"term": 3}, 4) == "leader_change"
    assert policy.stale_round_reason({"term": 4}, 4) == "driver_restart"
    assert len(policy.failed("aggregation_failed", "x" * 500)) == policy.REASON_CHARS


def test_payable_leaves_out_only_the_overspending_sites() -> None:
    charges = {"a": {"epsilon_total": 1.0}, "b": {"epsilon_total": 2.0 + 5e-10},
               "c": {"epsilon_total": 3.1}}
    assert set(policy.payable(charges, {"a": 1.0, "b": 2.0, "c": 3.0})) == {"a", "b"}


def test_round_metrics_average_the_survivors_unweighted() -> None:
    reported = {"a": {"eval_accuracy": 0.5, "train_loss": 1.0},
                "b": {"eval_accuracy": 0.7, "eval_loss": 0.4},
                "c": {"eval_accuracy": 0.0}}  # not a survivor: left out
    out = policy.round_metrics(["a", "b"], reported, 1.23456, 101)
    assert out == {"survivors": 2.0, "seconds": 1.235, "upload_values": 101.0,
                   "base_accuracy": 0.6, "base_loss": 0.4, "train_loss": 1.0}
