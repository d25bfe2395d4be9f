"""A hostile site under SecAgg+: the invalid sum is caught, and its sender found by halves.

Pure parts only (the real-process run is `simulations/hostile_sites.py`): the bound an
honest sum keeps, checked on sums of real fixed-point encodings, and the search, checked
against every culprit and pool size.
"""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.core import commands
from coordinator.core.queries import eligible_sites
from coordinator.core.round_config import DEFAULT_ROUND_CONFIG
from coordinator.core.state import apply, initial_state
from coordinator.round.aggregation import aggregate_problem
from coordinator.round.hostile import Search, attempts_bound
from privacy.plan import plan_round

DIM = 200


def _plan(n: int, clip: float = 0.5, max_examples: float = 10_000.0):
    config = {**DEFAULT_ROUND_CONFIG, "secure_aggregation": True, "compression": 1.0,
              "clip": clip, "max_examples": max_examples}
    return plan_round(federation="f", round_number=1, attempt=1, term=1, seed_hex="00" * 16,
                      participants=[f"s{i}" for i in range(n)], dim=DIM,
                      last_global_change=None, config=config)


def _sum(words: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(words[0], dtype=np.uint64)
    for w in words:
        total = (total + w.astype(np.uint64)) % (1 << 32)
    return total.astype(np.uint32)


def _honest(plan, rng: np.random.Generator, examples: int) -> np.ndarray:
    k = plan.k
    values = rng.uniform(-plan.clip, plan.clip, k)
    weight = min(examples, plan.max_weight) / plan.max_weight
    return plan.codec.encode(values * weight, weight, rng)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 30), seed=st.integers(0, 2**32 - 1),
       examples=st.lists(st.integers(1, 20_000), min_size=30, max_size=30),
       clip=st.sampled_from([0.05, 0.5, 3.0]))
def test_honest_sums_are_never_flagged(n, seed, examples, clip):
    plan = _plan(n, clip)
    rng = np.random.default_rng(seed)
    values, weight = plan.codec.decode(_sum([_honest(plan, rng, examples[i]) for i in range(n)]))
    assert aggregate_problem(values, weight, n, plan) is None


def test_each_hostile_input_of_the_issue_is_flagged():
    n, rng = 10, np.random.default_rng(7)
    plan = _plan(n)
    honest = [_honest(plan, rng, 60 + 10 * i) for i in range(n - 1)]
    codec = plan.codec
    negative = codec.encode(np.zeros(plan.k), 0.0, rng)
    negative[-1] = np.uint32((1 << 32) - int(codec.weight_scale))  # weight -1
    loud = codec.encode(np.full(plan.k, plan.clip), 0.0, rng)  # largest values, no weight
    garbage = rng.integers(0, 1 << 32, plan.k + 1, dtype=np.uint64).astype(np.uint32)
    for hostile, words in (("negative weight", negative), ("max values, zero weight", loud),
                           ("garbage", garbage)):
        values, weight = codec.decode(_sum([*honest, words]))
        problem = aggregate_problem(values, weight, n, plan)
        assert problem is not None, hostile


def _find(n: int, culprit: int, min_clients: int, seed: int) -> tuple[str | None, int]:
    sites = [f"s{i:02d}" for i in range(n)]
    bad = sites[culprit]
    rng = random.Random(seed)
    search = Search.start(sites)  # the first invalid sum: everyone took part
    invalid = 1
    for _ in range(64):
        if search.culprit() is not None:
            return search.culprit(), invalid
        group = search.sample(sites, n, min_clients, rng)
        assert group is not None and len(group) >= min_clients
        if bad in group:
            invalid += 1
            search = search.after_invalid(group)
        else:
            search = search.after_valid(group)
    return None, invalid


@settings(max_examples=200, deadline=None)
@given(n=st.integers(3, 64), data=st.data(), seed=st.integers(0, 2**31))
def test_the_search_names_the_culprit_within_log2_n_further_invalid_attempts(n, data, seed):
    culprit = data.draw(st.integers(0, n - 1))
    found, invalid = _find(n, culprit, min_clients=2, seed=seed)
    assert found == f"s{culprit:02d}"
    assert invalid <= attempts_bound(n)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(4, 40), min_clients=st.integers(2, 8), data=st.data(),
       seed=st.integers(0, 2**31))
def test_a_large_minimum_costs_attempts_but_the_search_still_ends(n, min_clients, data, seed):
    culprit = data.draw(st.integers(0, n - 1))
    if min_clients >= n:
        assert Search.start([f"s{i:02d}" for i in range(n)]).sample(
            [f"s{i:02d}" for i in range(n)], n, min_clients, random.Random(seed)) is None
        return
    found, invalid = _find(n, culprit, min_clients=min_clients, seed=seed)
    assert found == f"s{culprit:02d}" and invalid <= n


def test_two_sites_cannot_be_told_apart_without_exposing_one():
    search = Search.start(["a", "b"])
    assert search.sample(["a", "b"], 2, 2, random.Random(0)) is None


def test_quarantine_takes_a_site_out_of_sampling_once():
    s = initial_state()
    for site in ("a", "b"):
        assert apply(s, commands.enroll(site, site * 64 if site != "b" else "b" * 64))["ok"]
    assert eligible_sites(s) == ["a", "b"]
    r = apply(s, commands.quarantine("a", "invalid sum", 3, 2))
    assert r["ok"] and eligible_sites(s) == ["b"]
    assert s["sites"]["a"]["quarantined"] == {"reason": "invalid sum", "round": 3, "attempt": 2}
    again = apply(s, commands.quarantine("a", "invalid sum", 3, 3))
    assert not again["ok"] and again["code"] == "quarantined"
    assert not apply(s, commands.quarantine("zz", "x", 1, 1))["ok"]
