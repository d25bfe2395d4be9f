"""Privacy charges recomputed from the log itself: each site's whole PRV history, in order.

The log is written the way the leader writes it (``privacy.accounting.compute_charge`` over
the site's recorded runs, with its spend so far). The forgeries are made by someone holding
the audit key: they rewrite the log consistently (chain, signatures, checkpoints), so
nothing but the recomputation of the charges can tell.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from coordinator.audit import AuditSigner, AuditStore, Checkpoint, Entry, verify_log
from coordinator.audit.charges import ChargeChecker, prv_epsilon
from privacy.accounting import DPStep, compute_charge

DELTA = 1e-5
A, B = "hospital-a", "hospital-b"
RUN_A = {"noise_multiplier": 1.2, "sample_rate": 0.1, "steps": 10, "clip_norm": 1.0}
RUN_B = {"noise_multiplier": 1.5, "sample_rate": 0.05, "steps": 20, "clip_norm": 0.5}
RUN_B_LATER = {"noise_multiplier": 1.3, "sample_rate": 0.05, "steps": 30, "clip_norm": 0.5}
ROUNDS = 5
CHARGES = 2 * ROUNDS + 1  # both sites every round, plus hospital-a's charged abort
Log = tuple[list[Entry], list[Checkpoint], dict[str, int]]


@dataclass
class Leader:
    """Appends entries as a node's audit writer would, charging as the leader does."""

    store: AuditStore
    index: int = 0
    history: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {A: [], B: []})
    spent: dict[str, float] = field(default_factory=lambda: {A: 0.0, B: 0.0})

    def append(self, kind: str, payload: dict[str, Any]) -> int:
        self.index += 1
        return self.store.append(kind, payload, self.index).seq

    def charge(self, site: str, run: dict[str, Any]) -> dict[str, float]:
        c = compute_charge(self.history[site], run, DELTA, self.spent[site])
        self.history[site].append(run)
        self.spent[site] = c["epsilon_total"]
        return c


def _version(r: int) -> str:
    return hashlib.sha256(f"model after round {r}".encode()).hexdigest()


def write_log(store: AuditStore) -> dict[str, int]:
    """Two sites over five rounds; round 3 has a charged abort; B's budget and plan change
    after round 2. Returns the seq of the entries the tests aim at."""
    leader, seqs = Leader(store), {}
    for site in (A, B):
        seqs[f"enroll {site}"] = leader.append("client_enrolled", {
            "site": site, "public_key": hashlib.sha256(site.encode()).hexdigest(),
            "epsilon": 8.0, "delta": DELTA})
    leader.append("model_genesis", {"version": _version(0), "size": 100})
    for r in range(1, ROUNDS + 1):
        sites, attempt = [A, B], 1
        common = {"round": r, "term": 1, "participants": sites, "config_digest": "cfg"}
        leader.append("round_opened", {**common, "attempt": attempt, "base": _version(r - 1)})
        if r == 3:  # the update was sent, so the aborted attempt is charged
            seqs["abort 3"] = leader.append("round_aborted", {
                "round": r, "attempt": attempt, "term": 1, "reason": "stage timed out",
                "charges": {A: leader.charge(A, RUN_A)}})
            attempt = 2
            leader.append("round_opened", {**common, "attempt": attempt, "base": _version(2)})
        charges = {A: leader.charge(A, RUN_A), B: leader.charge(B, RUN_B if r <= 2 else RUN_B_LATER)}
        seqs[f"commit {r}"] = leader.append("round_committed", {
            "round": r, "attempt": attempt, "term": 1, "version": _version(r),
            "parent": _version(r - 1), "size": 100, "participants": sites, "survivors": sites,
            "metrics": {"accuracy": 0.5 + r / 20}, "charges": charges})
        if r == 2:
            seqs["budget B"] = leader.append("budget_changed", {
                "site": B, "epsilon": 9.0, "delta": DELTA, "old_epsilon": 8.0,
                "old_delta": DELTA, "spent": leader.spent[B]})
    return seqs


@pytest.fixture(scope="module")
def leader_log(signer: AuditSigner) -> Log:
    with AuditStore("sqlite://", signer=signer, checkpoint_every=4) as store:
        seqs = write_log(store)
        return store.entries(), store.checkpoints(), seqs


def forge(entries: list[Entry], signer: AuditSigner, seq: int,
          edit: Callable[[dict[str, Any]], None], url: str = "sqlite://") -> Log:
    """The log rewritten by someone holding the audit key, with entry ``seq`` edited:
    every later hash, signature and checkpoint is made anew and is valid."""
    with AuditStore(url, signer=signer, checkpoint_every=4) as store:
        for e in entries[1:]:
            payload = copy.deepcopy(e.payload)
            if e.seq == seq:
                edit(payload)
            store.append(e.kind, payload, e.raft_index)
        forged = store.entries(), store.checkpoints(), {}
    assert forged[0][0] == entries[0]  # same genesis: same key, nothing else to see
    return forged


def _verify(log: Log, signer: AuditSigner, **kw: Any) -> Any:
    return verify_log(log[0], log[1], genesis_key=signer.public_key, **kw)


def test_leader_written_charges_recompute(leader_log: Log, signer: AuditSigner) -> None:
    report = _verify(leader_log, signer, accountant=prv_epsilon)
    assert report.ok, report.issues
    assert report.counts["charges"] == CHARGES and report.counts["charges_unchecked"] == 0
    assert report.counts["checkpoints"] == len(leader_log[1]) > 0
    # the auditor's arithmetic is the leader's: equal to the last bit
    assert _verify(leader_log, signer, accountant=prv_epsilon, charge_rel_tol=0.0,
                   charge_abs_tol=0.0).ok
    unchecked = _verify(leader_log, signer)
    assert unchecked.ok and unchecked.counts["charges"] == 0
    assert unchecked.counts["charges_unchecked"] == CHARGES


def test_rewritten_epsilon_total_is_named(leader_log: Log, signer: AuditSigner) -> None:
    entries, _, seqs = leader_log
    target = seqs["commit 4"]

    def understate(payload: dict[str, Any]) -> None:
        payload["charges"][A]["epsilon_total"] *= 0.8

    forged = forge(entries, signer, target, understate)
    assert _verify(forged, signer).ok  # chain, signatures and checkpoints are all valid
    report = _verify(forged, signer, accountant=prv_epsilon)
    assert not report.ok and report.first_bad_seq == target
    assert "epsilon_total" in (report.reason or "") and A in (report.reason or "")
    # later charges are judged on the recorded runs, not on the forged number: one issue
    assert {(i.check, i.seq) for i in report.issues} == {("charge", target)}


def test_rewritten_noise_multiplier_is_named(leader_log: Log, signer: AuditSigner) -> None:
    entries, _, seqs = leader_log
    target = seqs["commit 2"]

    def claim_more_noise(payload: dict[str, Any]) -> None:
        payload["charges"][B]["noise_multiplier"] = 3.0  # epsilon and epsilon_total kept

    forged = forge(entries, signer, target, claim_more_noise)
    assert _verify(forged, signer).ok
    report = _verify(forged, signer, accountant=prv_epsilon)
    assert not report.ok and report.first_bad_seq == target
    assert report.issues[0].check == "charge" and B in (report.reason or "")
    assert "recomputed" in (report.reason or "")


def test_charged_abort_is_part_of_the_history(leader_log: Log, signer: AuditSigner) -> None:
    entries, _, seqs = leader_log

    def hide_charge(payload: dict[str, Any]) -> None:
        payload["charges"] = {}

    forged = forge(entries, signer, seqs["abort 3"], hide_charge)
    report = _verify(forged, signer, accountant=prv_epsilon)
    # the abort itself now charges nothing; the next charge of A still counts the run
    assert not report.ok and report.first_bad_seq == seqs["commit 3"]
    assert A in (report.reason or "")


def test_charges_are_held_against_budgets(leader_log: Log, signer: AuditSigner) -> None:
    entries, _, seqs = leader_log

    def small_budget(payload: dict[str, Any]) -> None:
        payload["epsilon"] = 3.0

    report = _verify(forge(entries, signer, seqs[f"enroll {A}"], small_budget), signer,
                     accountant=prv_epsilon)
    # A's total passes 3.0 at the commit of round 3 (after the charged abort)
    assert not report.ok and report.first_bad_seq == seqs["commit 3"]
    assert "exceeds its budget" in (report.reason or "")

    def below_spent(payload: dict[str, Any]) -> None:
        payload["epsilon"] = 0.5

    report = _verify(forge(entries, signer, seqs["budget B"], below_spent), signer,
                     accountant=prv_epsilon)
    assert not report.ok and report.first_bad_seq == seqs["budget B"]
    assert "already spent" in (report.reason or "")


def test_edit_without_the_key_does_not_cascade(leader_log: Log, signer: AuditSigner) -> None:
    entries, cps, seqs = leader_log
    target = seqs["commit 2"]
    payload = copy.deepcopy(entries[target].payload)
    payload["charges"][B]["noise_multiplier"] = 3.0
    edited = list(entries)
    edited[target] = dataclasses.replace(entries[target], payload=payload)
    report = verify_log(edited, cps, genesis_key=signer.public_key, accountant=prv_epsilon)
    assert not report.ok and report.first_bad_seq == target
    assert report.issues[0].check == "hash"
    # the damaged entry is reported once: its sites are not judged on numbers that may be
    # the edit, at it or at any later charge
    assert all(i.seq == target for i in report.issues if i.seq is not None)
    assert not any(i.check == "charge" for i in report.issues)


def test_cli_recomputes_charges_by_default(leader_log: Log, signer: AuditSigner,
                                           tmp_path: Path) -> None:
    from coordinator.audit.cli import audit_app

    runner = CliRunner(env={"COLUMNS": "200"})
    entries, _, seqs = leader_log
    good = f"sqlite:///{tmp_path / 'good.db'}"
    forge(entries, signer, -1, lambda p: None, url=good)  # an untouched copy on disk
    result = runner.invoke(audit_app, ["verify", "--db", good, "--key",
                                       signer.public_key_hex, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["counts"]["charges"] == CHARGES
    text = runner.invoke(audit_app, ["verify", "--db", good])
    assert f"{CHARGES} privacy charges verified" in text.stdout

    bad = f"sqlite:///{tmp_path / 'bad.db'}"
    target = seqs["commit 5"]
    forge(entries, signer, target,
          lambda p: p["charges"][B].__setitem__("epsilon", p["charges"][B]["epsilon"] / 2),
          url=bad)
    result = runner.invoke(audit_app, ["verify", "--db", bad, "--key", signer.public_key_hex])
    assert result.exit_code == 1 and f"first bad entry is seq {target}" in result.stdout
    report = json.loads(runner.invoke(audit_app, ["verify", "--db", bad, "--json"]).stdout)
    assert report["first_bad_seq"] == target and report["issues"][0]["check"] == "charge"
    skipped = runner.invoke(audit_app, ["verify", "--db", bad, "--no-charges", "--json",
                                        "--key", signer.public_key_hex])
    assert skipped.exit_code == 0
    assert json.loads(skipped.stdout)["counts"]["charges_unchecked"] == CHARGES


# --- the walk itself, with a fast stand-in accountant ------------------------------------


def _entry(seq: int, kind: str, payload: dict[str, Any]) -> Entry:
    return Entry(seq, kind, payload, seq, "", "", "", "")


def _additive(history: Sequence[DPStep], delta: float) -> float:
    return sum(s.steps * s.sample_rate / s.noise_multiplier for s in history)


def _charge_entries(runs: dict[str, list[dict[str, Any]]]) -> list[Entry]:
    """One round_committed per round, charging each site its run with an additive epsilon."""
    history: dict[str, list[DPStep]] = {s: [] for s in runs}
    entries = []
    for r in range(len(next(iter(runs.values())))):
        charges = {}
        for site, site_runs in runs.items():
            before = _additive(history[site], DELTA)
            step = DPStep(**site_runs[r])
            history[site].append(step)
            total = _additive(history[site], DELTA)
            charges[site] = {**site_runs[r], "delta": DELTA, "epsilon": total - before,
                             "epsilon_total": total}
        entries.append(_entry(r, "round_committed", {"round": r, "charges": charges}))
    return entries


def test_identical_histories_are_evaluated_once() -> None:
    calls: list[int] = []

    def counting(history: Sequence[DPStep], delta: float) -> float:
        calls.append(len(history))
        return _additive(history, delta)

    entries = _charge_entries({A: [RUN_A] * 4, B: [RUN_A] * 4, "third": [RUN_B] * 4})
    checker = ChargeChecker(counting)
    issues: list[tuple[str, int]] = []
    for e in entries:
        checker.observe(e, lambda reason, seq: issues.append((reason, seq)))
    assert not issues and checker.checked == 12
    assert checker.evaluations == len(calls) == 8  # A and B share every prefix
    assert sorted(calls) == [1, 1, 2, 2, 3, 3, 4, 4]


@pytest.mark.parametrize(("field_name", "value", "says"), [
    ("steps", 10.5, "whole number"),
    ("sample_rate", 1.5, "unusable DP parameters"),
    ("noise_multiplier", True, "finite number"),
    ("delta", 2.0, "not in (0, 1)"),
])
def test_unreadable_charge_is_named_once(field_name: str, value: Any, says: str) -> None:
    entries = _charge_entries({A: [RUN_A] * 3})
    entries[1].payload["charges"][A][field_name] = value
    issues: list[tuple[str, int]] = []
    checker = ChargeChecker(_additive)
    for e in entries:
        checker.observe(e, lambda reason, seq: issues.append((reason, seq)))
    assert len(issues) == 1 and issues[0][1] == 1 and says in issues[0][0]
    assert checker.checked == 1  # the later charge is not judged on a partial history


# --- late charges: an attempt whose leader died, charged afterwards -----------------------


def write_late_charge_log(store: AuditStore) -> dict[str, int]:
    """What a cluster applies when the leader of attempt 1.1 dies holding A's and B's
    updates: term 2 aborts 1.1 with no charges, commits 1.2 charging both, then charges
    both late for 1.1 (`late_charge`). Entries come from the node's own audit writer."""
    from coordinator.audit.writer import audit_record
    from coordinator.core.state import apply, initial_state

    state, seqs = initial_state(), {}

    def run(name: str, cmd: dict[str, Any]) -> dict[str, Any]:
        result = apply(state, cmd)
        assert result["ok"], result
        record = audit_record(cmd, result, state)
        if record is not None:
            seqs[name] = store.append(*record, raft_index=state["seq"]).seq
        return result

    def charge(site: str, run_: dict[str, Any]) -> dict[str, float]:
        rec = state["sites"][site]
        history = [{k: c[k] for k in ("noise_multiplier", "sample_rate", "steps", "clip_norm")}
                   for c in rec["charges"]]
        return compute_charge(history, run_, DELTA, rec["spent"])

    for site in (A, B):
        run(f"enroll {site}", {"op": "enroll", "site": site, "epsilon": 8.0, "delta": DELTA,
                               "public_key": hashlib.sha256(site.encode()).hexdigest()})
    run("genesis", {"op": "genesis", "version": _version(0), "size": 100, "holders": ["n1"],
                    "cluster_size": 1})
    run("claim 1", {"op": "claim", "term": 1, "node": "n1"})
    run("train", {"op": "train", "rounds": 1})
    opened = {"op": "round_open", "round": 1, "base": _version(0), "participants": [A, B],
              "seed": "s"}
    run("open 1.1", {**opened, "term": 1, "attempt": 1})
    run("claim 2", {"op": "claim", "term": 2, "node": "n2"})
    run("abort 1.1", {"op": "round_abort", "term": 2, "round": 1, "attempt": 1,
                      "reason": "leader_change"})
    run("open 1.2", {**opened, "term": 2, "attempt": 2})
    run("commit 1.2", {"op": "round_commit", "term": 2, "round": 1, "attempt": 2,
                       "version": _version(1), "parent": _version(0), "size": 100,
                       "survivors": [A, B], "holders": ["n2"], "cluster_size": 1,
                       "charges": {A: charge(A, RUN_A), B: charge(B, RUN_B)}})
    for site, run_ in ((A, RUN_A), (B, RUN_B)):
        run(f"late {site}", {"op": "late_charge", "term": 2, "round": 1, "attempt": 1,
                             "site": site, "charge": charge(site, run_),
                             "prior_charges": len(state["sites"][site]["charges"])})
    return seqs


@pytest.fixture(scope="module")
def late_log(signer: AuditSigner) -> Log:
    with AuditStore("sqlite://", signer=signer, checkpoint_every=4) as store:
        seqs = write_late_charge_log(store)
        assert store.round(1).attempts[0].charges.keys() == {A, B}  # shown on attempt 1.1
        spend = store.spend()
        assert spend[A].rounds == [1, 1] and spend[A].cumulative[-1] == pytest.approx(
            prv_epsilon([DPStep(**RUN_A)] * 2, DELTA))
        return store.entries(), store.checkpoints(), seqs


def test_late_charges_verify_as_part_of_each_history(late_log: Log, signer: AuditSigner) -> None:
    entries, _, seqs = late_log
    assert entries[seqs[f"late {A}"]].kind == "charge_recorded"
    report = _verify(late_log, signer, accountant=prv_epsilon, charge_rel_tol=0.0,
                     charge_abs_tol=0.0)
    assert report.ok, report.issues
    assert report.counts["charges"] == 4


def test_tampered_late_charge_is_named(late_log: Log, signer: AuditSigner) -> None:
    entries, _, seqs = late_log
    target = seqs[f"late {B}"]

    def understate(payload: dict[str, Any]) -> None:
        payload["charges"][B]["epsilon_total"] *= 0.8

    forged = forge(entries, signer, target, understate)
    assert _verify(forged, signer).ok  # re-signed consistently: only the recomputation sees it
    report = _verify(forged, signer, accountant=prv_epsilon)
    assert not report.ok and report.first_bad_seq == target
    assert B in (report.reason or "") and "epsilon_total" in (report.reason or "")

    def more_noise(payload: dict[str, Any]) -> None:
        payload["charges"][A]["noise_multiplier"] *= 2

    report = _verify(forge(entries, signer, seqs[f"late {A}"], more_noise), signer,
                     accountant=prv_epsilon)
    assert not report.ok and report.first_bad_seq == seqs[f"late {A}"]
