"""The replicated state machine on its own: fencing, idempotency, round order."""

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.core import commands
from coordinator.core.queries import charge_status, head, last_round
from coordinator.core.state import apply, initial_state

H0, H1, H2 = "0" * 64, "1" * 64, "2" * 64
KEY_A, KEY_B, KEY_C = "a" * 64, "b" * 64, "c" * 64


def _cluster() -> dict:
    s = initial_state()
    for site, key in (("site-a", KEY_A), ("site-b", KEY_B), ("site-c", KEY_C)):
        assert apply(s, {"op": "enroll", "site": site, "public_key": key})["ok"]
    assert apply(s, {"op": "genesis", "version": H0, "size": 10, "holders": ["n1", "n2"],
                     "cluster_size": 3})["ok"]
    assert apply(s, {"op": "claim", "term": 5, "node": "n1"})["ok"]
    assert apply(s, {"op": "train", "rounds": 2, "config": {"min_clients": 2}})["ok"]
    return s


def _open(s, term=5, rnd=1, attempt=1, base=H0, sites=("site-a", "site-b")):
    return apply(s, {"op": "round_open", "term": term, "round": rnd, "attempt": attempt,
                     "base": base, "participants": list(sites), "seed": "ab"})


def _commit(s, term=5, rnd=1, attempt=1, version=H1, parent=H0, survivors=("site-a", "site-b")):
    return apply(s, {"op": "round_commit", "term": term, "round": rnd, "attempt": attempt,
                     "version": version, "parent": parent, "size": 10,
                     "survivors": list(survivors), "metrics": {"loss": 0.5},
                     "holders": ["n1", "n2"], "cluster_size": 3})


def _domain(s):
    d = copy.deepcopy(s)
    for k in ("seq", "requests", "request_order"):
        d.pop(k)
    return d


def test_round_lifecycle_builds_one_hash_chain():
    s = _cluster()
    assert _open(s)["ok"]
    assert _commit(s)["ok"]
    assert _open(s, rnd=2, base=H1)["ok"]
    assert _commit(s, rnd=2, version=H2, parent=H1)["ok"]
    assert [v["hash"] for v in s["versions"]] == [H0, H1, H2]
    assert [v["parent"] for v in s["versions"]] == [None, H0, H1]
    assert last_round(s) == 2 and head(s) == H2
    # target reached: no further round may open
    r = _open(s, rnd=3, base=H2)
    assert not r["ok"] and r["code"] == "no_training"


def test_stale_term_rejected_and_state_unchanged():
    s = _cluster()
    assert apply(s, {"op": "claim", "term": 6, "node": "n2"})["ok"]
    before = _domain(s)
    r = _open(s, term=5)
    assert r == {"ok": False, "code": "stale_term", "error": r["error"]}
    assert _domain(s) == before
    assert not apply(s, {"op": "claim", "term": 4, "node": "n1"})["ok"]
    assert _domain(s) == before
    assert _open(s, term=6)["ok"]


def test_unclaimed_term_and_term_taken():
    s = _cluster()
    assert _open(s, term=7)["code"] == "unclaimed_term"
    assert apply(s, {"op": "claim", "term": 5, "node": "n9"})["code"] == "term_taken"
    assert apply(s, {"op": "claim", "term": 5, "node": "n1"})["ok"]  # idempotent re-claim


def test_deposed_leader_cannot_commit_open_round():
    s = _cluster()
    assert _open(s)["ok"]
    assert apply(s, {"op": "claim", "term": 6, "node": "n2"})["ok"]
    r = _commit(s, term=5)
    assert not r["ok"] and r["code"] == "stale_term"
    assert last_round(s) == 0
    assert apply(s, {"op": "round_abort", "term": 6, "round": 1, "attempt": 1,
                     "reason": "leader_change"})["ok"]
    assert _open(s, term=6, attempt=1)["code"] == "wrong_attempt"
    assert _open(s, term=6, attempt=2)["ok"]
    assert _commit(s, term=6, attempt=2)["ok"]
    assert s["history"][1]["aborted"][0]["reason"] == "leader_change"
    assert s["history"][1]["committed"]["attempt"] == 2


def test_repeated_request_id_applied_once():
    s = _cluster()
    cmd = {"op": "round_open", "term": 5, "round": 1, "attempt": 1, "base": H0,
           "participants": ["site-a", "site-b"], "seed": "x", "request_id": "req-1"}
    first = apply(s, dict(cmd))
    again = apply(s, dict(cmd))
    assert first["ok"] and again == {**first, "replayed": True}
    assert s["attempts"][1] == 1
    commit = {"op": "round_commit", "term": 5, "round": 1, "attempt": 1, "version": H1,
              "parent": H0, "size": 1, "survivors": ["site-a", "site-b"], "metrics": {},
              "holders": ["n1", "n2"], "cluster_size": 3, "request_id": "req-2"}
    assert apply(s, dict(commit))["ok"]
    assert apply(s, dict(commit))["ok"]  # the retry sees the first result, not "no open round"
    assert len(s["versions"]) == 2


def test_out_of_order_round_transitions_rejected():
    s = _cluster()
    assert _commit(s)["code"] == "no_open_round"
    assert _open(s, rnd=2)["code"] == "wrong_round"
    assert _open(s)["ok"]
    assert _open(s)["code"] == "round_in_progress"
    assert _commit(s, rnd=1, attempt=2)["code"] == "wrong_round"
    assert _commit(s, parent=H2)["code"] == "wrong_base"
    assert _commit(s, survivors=("site-a", "site-z"))["code"] in ("malformed", "unknown_site")
    assert _commit(s, survivors=("site-a",))["code"] == "too_few"
    assert apply(s, {"op": "round_abort", "term": 5, "round": 1, "attempt": 9,
                     "reason": "x"})["code"] == "wrong_round"
    assert _commit(s)["ok"]
    assert _commit(s)["code"] == "no_open_round"


def test_commit_needs_blob_quorum():
    s = _cluster()
    assert _open(s)["ok"]
    r = apply(s, {"op": "round_commit", "term": 5, "round": 1, "attempt": 1, "version": H1,
                  "parent": H0, "size": 10, "survivors": ["site-a", "site-b"],
                  "holders": ["n1"], "cluster_size": 3})
    assert r["code"] == "no_quorum"


def test_revoked_and_unknown_sites_cannot_participate():
    s = _cluster()
    assert apply(s, {"op": "revoke", "site": "site-c"})["ok"]
    assert _open(s, sites=("site-a", "site-c"))["code"] == "unknown_site"
    assert _open(s, sites=("site-a", "ghost"))["code"] == "unknown_site"
    assert apply(s, {"op": "enroll", "site": "site-c", "public_key": "d" * 64})["code"] == "exists"
    assert apply(s, {"op": "enroll", "site": "site-d", "public_key": KEY_A})["code"] == "exists"


@pytest.mark.parametrize("cmd", [
    None, [], {"op": "nope"}, {"op": "enroll", "site": "bad id!", "public_key": KEY_A},
    {"op": "enroll", "site": "ok", "public_key": "XYZ"},
    {"op": "train", "rounds": 0}, {"op": "train", "rounds": 2, "config": {"bogus": 1}},
    {"op": "train", "rounds": 2, "config": {"lr": float("nan")}},
    {"op": "train", "rounds": 2, "config": {"fraction": 2.0}},
    {"op": "round_open", "term": "5"}, {"op": "claim", "term": True, "node": "n"},
])
def test_bad_commands_change_nothing(cmd):
    s = _cluster()
    before = _domain(s)
    r = apply(s, cmd)
    assert r["ok"] is False and r["code"] and r["error"]
    assert _domain(s) == before


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["open", "commit", "abort", "claim", "train"]), max_size=30),
       st.integers(0, 2**31))
def test_replicas_applying_the_same_log_agree(ops, salt):
    """Determinism: two replicas fed the same command log end in the same state."""
    log = []
    s = _cluster()
    term = 5
    for i, op in enumerate(ops):
        r, a = last_round(s) + 1, s["attempts"].get(last_round(s) + 1, 0)
        if op == "claim":
            term += 1
            cmd = {"op": "claim", "term": term, "node": f"n{term}"}
        elif op == "open":
            cmd = {"op": "round_open", "term": term, "round": r, "attempt": a + 1,
                   "base": head(s), "participants": ["site-a", "site-b"], "seed": str(salt)}
        elif op == "commit":
            cmd = {"op": "round_commit", "term": term, "round": r, "attempt": a,
                   "version": f"{(salt + i) % 16:x}" * 64, "parent": head(s), "size": 3,
                   "survivors": ["site-a", "site-b"], "holders": ["n1", "n2"],
                   "cluster_size": 3}
        elif op == "abort":
            cmd = {"op": "round_abort", "term": term, "round": r, "attempt": a, "reason": "t"}
        else:
            cmd = {"op": "train", "rounds": 1}
        log.append(cmd)
        apply(s, copy.deepcopy(cmd))
    replica = _cluster()
    for cmd in log:
        apply(replica, copy.deepcopy(cmd))
    assert replica == s
    hashes = [v["hash"] for v in s["versions"]]
    assert len(hashes) == len(set(hashes))
    for prev, v in zip(s["versions"], s["versions"][1:], strict=False):
        assert v["parent"] == prev["hash"] and v["round"] == prev["round"] + 1


def _charge(eps, total, delta=1e-5):
    return {"noise_multiplier": 1.1, "sample_rate": 0.2, "steps": 10, "clip_norm": 1.0,
            "epsilon": eps, "delta": delta, "epsilon_total": total}


def test_privacy_ledger_charges_commits_and_aborts_and_caps_spend():
    s = _cluster()
    assert apply(s, {"op": "enroll", "site": "site-d", "public_key": "d" * 64,
                     "epsilon": 1.0, "delta": 1e-5})["ok"]
    assert _open(s, sites=("site-a", "site-d"))["ok"]
    # an aborted attempt is charged too
    assert apply(s, {"op": "round_abort", "term": 5, "round": 1, "attempt": 1, "reason": "x",
                     "charges": {"site-d": _charge(0.4, 0.4)}})["ok"]
    assert s["sites"]["site-d"]["spent"] == 0.4
    assert _open(s, attempt=2, sites=("site-a", "site-d"))["ok"]
    before = _domain(s)
    over = apply(s, {"op": "round_commit", "term": 5, "round": 1, "attempt": 2, "version": H1,
                     "parent": H0, "size": 10, "survivors": ["site-a", "site-d"],
                     "holders": ["n1", "n2"], "cluster_size": 3,
                     "charges": {"site-d": _charge(0.7, 1.1)}})
    assert over["code"] == "overspend" and _domain(s) == before
    for bad in ({"site-b": _charge(0.1, 0.1)}, {"site-d": _charge(0.1, 0.3)},
                {"site-d": _charge(0.1, 0.5, delta=1e-3)}, {"site-d": {"epsilon": 1}}):
        r = apply(s, {"op": "round_commit", "term": 5, "round": 1, "attempt": 2, "version": H1,
                      "parent": H0, "size": 10, "survivors": ["site-a", "site-d"],
                      "holders": ["n1", "n2"], "cluster_size": 3, "charges": bad})
        assert r["code"] == "malformed", bad
    assert _domain(s) == before
    assert apply(s, {"op": "round_commit", "term": 5, "round": 1, "attempt": 2, "version": H1,
                     "parent": H0, "size": 10, "survivors": ["site-a", "site-d"],
                     "holders": ["n1", "n2"], "cluster_size": 3,
                     "charges": {"site-d": _charge(0.5, 0.9)}})["ok"]
    d = s["sites"]["site-d"]
    assert d["spent"] == 0.9 and [c["attempt"] for c in d["charges"]] == [1, 2]


def _set_budget(s, site="site-d", request_id=None, **fields):
    cmd = {"op": "set_budget", "site": site, **fields}
    if request_id is not None:
        cmd["request_id"] = request_id
    return apply(s, cmd)


def _charged_site_d():
    """site-d (budget 1.0) charged 0.9 in round 1."""
    s = _cluster()
    assert apply(s, {"op": "enroll", "site": "site-d", "public_key": "d" * 64,
                     "epsilon": 1.0, "delta": 1e-5})["ok"]
    assert _open(s, sites=("site-a", "site-d"))["ok"]
    assert apply(s, {"op": "round_commit", "term": 5, "round": 1, "attempt": 1, "version": H1,
                     "parent": H0, "size": 10, "survivors": ["site-a", "site-d"],
                     "holders": ["n1", "n2"], "cluster_size": 3,
                     "charges": {"site-d": _charge(0.9, 0.9)}})["ok"]
    return s


def test_budget_change_is_accepted_and_enforced():
    s = _charged_site_d()
    r = _set_budget(s, epsilon=2.0, operator="alice")
    assert r == {"ok": True, "site": "site-d", "budget": {"epsilon": 2.0, "delta": 1e-5},
                 "old_budget": {"epsilon": 1.0, "delta": 1e-5}, "spent": 0.9,
                 "changed": True, "operator": "alice"}
    assert s["sites"]["site-d"]["budget"] == {"epsilon": 2.0, "delta": 1e-5}
    # the new budget is the one the ledger enforces: 1.5 now fits, 2.5 does not
    assert _open(s, rnd=2, base=H1, sites=("site-a", "site-d"))["ok"]
    commit = {"op": "round_commit", "term": 5, "round": 2, "attempt": 1, "version": H2,
              "parent": H1, "size": 10, "survivors": ["site-a", "site-d"],
              "holders": ["n1", "n2"], "cluster_size": 3}
    assert apply(s, {**commit, "charges": {"site-d": _charge(1.6, 2.5)}})["code"] == "overspend"
    assert apply(s, {**commit, "charges": {"site-d": _charge(0.6, 1.5)}})["ok"]
    # setting the budget it already has is accepted, and says nothing changed
    same = _set_budget(s, epsilon=2.0)
    assert same["ok"] and same["changed"] is False
    # delta may change while a site has no charges
    r = _set_budget(s, site="site-c", epsilon=4.0, delta=1e-6)
    assert r["ok"] and s["sites"]["site-c"]["budget"] == {"epsilon": 4.0, "delta": 1e-6}


def test_budget_below_spent_is_rejected_and_changes_nothing():
    s = _charged_site_d()
    before = _domain(s)
    r = _set_budget(s, epsilon=0.5)
    assert r["ok"] is False and r["code"] == "below_spent"
    assert "already spent epsilon 0.9" in r["error"] and "0.5" in r["error"]
    assert _domain(s) == before
    r = _set_budget(s, epsilon=2.0, delta=1e-6)
    assert r["code"] == "delta_in_use" and _domain(s) == before
    assert _set_budget(s, epsilon=0.9)["ok"]  # exactly what it spent: exhausted, not over


@pytest.mark.parametrize(("site", "fields", "code"), [
    ("site-d", {"epsilon": float("nan")}, "malformed"),
    ("site-d", {"epsilon": float("inf")}, "malformed"),
    ("site-d", {"epsilon": -1.0}, "malformed"),
    ("site-d", {"epsilon": 0}, "malformed"),
    ("site-d", {"epsilon": True}, "malformed"),
    ("site-d", {"epsilon": "3"}, "malformed"),
    ("site-d", {}, "malformed"),
    ("site-d", {"epsilon": 3.0, "delta": -1e-5}, "malformed"),
    ("site-d", {"epsilon": 3.0, "delta": float("nan")}, "malformed"),
    ("site-d", {"epsilon": 3.0, "delta": 1.0}, "malformed"),
    ("site-d", {"epsilon": 3.0, "operator": 7}, "malformed"),
    ("ghost", {"epsilon": 3.0}, "unknown_site"),
    ("bad id!", {"epsilon": 3.0}, "malformed"),
    ("site-c", {"epsilon": 3.0}, "revoked"),
])
def test_bad_budget_changes_are_rejected(site, fields, code):
    s = _charged_site_d()
    assert apply(s, {"op": "revoke", "site": "site-c"})["ok"]
    before = _domain(s)
    r = _set_budget(s, site=site, **fields)
    assert r["ok"] is False and r["code"] == code and r["error"]
    assert _domain(s) == before


def test_budget_change_is_idempotent_by_request_id():
    s = _charged_site_d()
    first = _set_budget(s, epsilon=3.0, request_id="budget-1")
    again = _set_budget(s, epsilon=3.0, request_id="budget-1")
    assert first["ok"] and first["changed"] and again == {**first, "replayed": True}
    # a retry applies once even if the value changed in between: the first result stands
    late = _set_budget(s, epsilon=5.0, request_id="budget-1")
    assert late == again and s["sites"]["site-d"]["budget"]["epsilon"] == 3.0
    replica = _charged_site_d()
    for eps in (3.0, 3.0, 5.0):
        _set_budget(replica, epsilon=eps, request_id="budget-1")
    assert replica == s


def _aborted_by_leader_change():
    """Round 1 attempt 1 (site-a, site-d; budget of site-d 1.0) opened in term 5; its
    leader dies and term 6 aborts it with no charges, then commits attempt 2."""
    s = _cluster()
    assert apply(s, {"op": "enroll", "site": "site-d", "public_key": "d" * 64,
                     "epsilon": 1.0, "delta": 1e-5})["ok"]
    assert _open(s, sites=("site-a", "site-d"))["ok"]
    assert apply(s, {"op": "claim", "term": 6, "node": "n2"})["ok"]
    assert apply(s, {"op": "round_abort", "term": 6, "round": 1, "attempt": 1,
                     "reason": "leader_change"})["ok"]
    assert _open(s, term=6, attempt=2, sites=("site-a", "site-b"))["ok"]
    assert _commit(s, term=6, attempt=2)["ok"]
    return s


def _late(s, site="site-d", rnd=1, attempt=1, term=6, prior=0, charge=None, **extra):
    return apply(s, {"op": "late_charge", "term": term, "round": rnd, "attempt": attempt,
                     "site": site, "prior_charges": prior, "charge": charge or _charge(0.4, 0.4),
                     **extra})


def test_late_charge_recorded_on_the_aborted_attempt_and_the_ledger():
    s = _aborted_by_leader_change()
    assert charge_status(s, "site-d", 1, 1) == "chargeable"
    assert charge_status(s, "site-b", 1, 1) == "uncharged"  # not sampled for 1.1
    assert charge_status(s, "site-d", 1, 2) == "uncharged"  # committed without it
    assert charge_status(s, "site-d", 2, 1) == "pending"
    assert charge_status(s, "site-d", 1, 9) == "uncharged"  # round 1 committed: never will be
    r = _late(s, request_id="late-1")
    assert r == {"ok": True, "round": 1, "attempt": 1, "term": 6, "site": "site-d",
                 "charge": _charge(0.4, 0.4), "overspent": False}
    assert s["history"][1]["aborted"][0]["charges"] == {"site-d": _charge(0.4, 0.4)}
    d = s["sites"]["site-d"]
    assert d["spent"] == 0.4 and d["charges"] == [{"round": 1, "attempt": 1, **_charge(0.4, 0.4)}]
    assert charge_status(s, "site-d", 1, 1) == "charged"
    # a retry with the same request id is the same result, applied once
    before = _domain(s)
    assert _late(s, request_id="late-1") == {**r, "replayed": True}
    assert _domain(s) == before
    # a second charge for the same site and attempt is refused, whatever its id
    assert _late(s, prior=1, charge=_charge(0.2, 0.6))["code"] == "already_charged"
    assert _domain(s) == before


@pytest.mark.parametrize("change, code", [
    ({"attempt": 2}, "not_aborted"),  # committed
    ({"rnd": 2}, "not_aborted"),  # never opened
    ({"attempt": 7}, "not_aborted"),  # unknown attempt
    ({"site": "site-b"}, "not_participant"),
    ({"site": "ghost"}, "unknown_site"),
    ({"term": 5}, "stale_term"),
    ({"term": 7}, "unclaimed_term"),
    ({"prior": 1}, "stale_history"),  # computed over another history than the ledger's
    ({"charge": _charge(0.4, 0.4, delta=1e-3)}, "malformed"),
    ({"charge": {"epsilon": 0.4}}, "malformed"),
    ({"charge": {**_charge(0.4, 0.4), "steps": float("nan")}}, "malformed"),
])
def test_late_charge_rejections_change_nothing(change, code):
    s = _aborted_by_leader_change()
    before = _domain(s)
    r = _late(s, **change)
    assert r["ok"] is False and r["code"] == code, r
    assert _domain(s) == before


def test_late_charge_on_an_open_attempt_is_refused():
    s = _cluster()
    assert _open(s)["ok"]
    assert _late(s, site="site-a", term=5)["code"] == "not_aborted"
    assert charge_status(s, "site-a", 1, 1) == "pending"


def test_late_charge_over_budget_is_recorded_and_flagged():
    """The site already spent it: the ledger records the truth, and says so."""
    s = _aborted_by_leader_change()
    r = _late(s, charge=_charge(1.2, 1.2))
    assert r["ok"] and r["overspent"] is True
    assert s["sites"]["site-d"]["spent"] == 1.2
    # a round cannot charge it any further
    assert _open(s, term=6, rnd=2, base=H1, sites=("site-a", "site-d"))["ok"]
    over = apply(s, {"op": "round_commit", "term": 6, "round": 2, "attempt": 1, "version": H2,
                     "parent": H1, "size": 10, "survivors": ["site-a", "site-d"],
                     "holders": ["n1", "n2"], "cluster_size": 3,
                     "charges": {"site-d": _charge(0.1, 1.3)}})
    assert over["code"] == "overspend" and s["sites"]["site-d"]["spent"] == 1.2


def test_a_write_submitted_before_the_fence_is_refused_unapplied_and_retryable():
    s = _cluster()  # fence term 5
    before = _domain(s)
    stale = {"op": "revoke", "site": "site-c", "request_id": "w1", "submitted_term": 4}
    r = apply(s, stale)
    assert r["code"] == "stale_submission" and not r["ok"]
    assert _domain(s) == before  # nothing applied, nothing remembered under w1
    again = apply(s, {**stale, "submitted_term": 5})
    assert again["ok"] and not again.get("replayed")
    assert s["sites"]["site-c"]["revoked"]
    # the old copy arriving later is a replay of the applied one, not a second write
    assert apply(s, stale).get("replayed") is True


@pytest.mark.parametrize("term", ["5", 5.0, True, None])
def test_a_malformed_submitted_term_is_refused(term):
    s = _cluster()
    before = _domain(s)
    r = apply(s, {"op": "revoke", "site": "site-c", "submitted_term": term})
    if term is None:
        assert r["ok"]  # absent: not checked
    else:
        assert r["code"] == "malformed" and _domain(s) == before


def _head(size: int) -> dict:
    return {"tree_size": size, "root_hash": "a" * 64, "key_id": "0123456789abcdef",
            "signature": "ab" * 64}


def test_the_audit_head_only_grows_and_a_bad_one_changes_nothing() -> None:
    s = initial_state()
    assert apply(s, commands.audit_head(_head(5)))["ok"] and s["audit_head"]["tree_size"] == 5
    for stale in (_head(5), _head(3)):
        r = apply(s, commands.audit_head(stale))
        assert not r["ok"] and r["code"] == "stale"
    for bad in ({**_head(9), "root_hash": "x"}, {**_head(9), "key_id": "k"},
                {**_head(9), "extra": 1}, {**_head(9), "tree_size": True},
                {**_head(9), "signature": "not hex"}, _head(0)):
        before = copy.deepcopy({k: v for k, v in s.items() if k != "seq"})
        r = apply(s, commands.audit_head(bad))
        assert not r["ok"] and r["code"] == "malformed", bad
        assert {k: v for k, v in s.items() if k != "seq"} == before
    assert apply(s, commands.audit_head(_head(6)))["ok"] and s["audit_head"] == _head(6)


def test_lookups_use_indexes_that_a_restored_state_rebuilds() -> None:
    """Commits and enrolments check hashes and keys through indexes; a state restored from
    before the indexes existed builds them on first use, the same on every replica."""
    s = initial_state()
    assert apply(s, {"op": "enroll", "site": "a", "public_key": "a" * 64})["ok"]
    assert apply(s, {"op": "genesis", "version": "0" * 64, "size": 1, "holders": ["n1"],
                     "cluster_size": 1})["ok"]
    assert s["version_index"] == {"0" * 64: 0} and s["key_index"] == {"a" * 64: "a"}
    old = copy.deepcopy(s)
    del old["version_index"], old["key_index"]
    refused = apply(old, {"op": "enroll", "site": "b", "public_key": "a" * 64})
    assert refused["code"] == "exists" and old["key_index"] == {"a" * 64: "a"}
    assert apply(old, {"op": "genesis", "version": "0" * 64, "size": 1, "holders": ["n1"],
                       "cluster_size": 1, "fresh": True})["version"] == "0" * 64
    assert old["version_index"] == s["version_index"]
