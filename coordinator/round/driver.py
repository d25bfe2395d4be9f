"""The leader-only round driver: claim, plan, collect, aggregate, replicate, commit.

Every step that matters is a fenced command carrying this leader's term; the driver's
own memory (the open session and its running sum) dies with its leadership. A new
leader first claims its term, then aborts any round it did not open itself and runs
that round again as a new attempt: a round is never half-committed.

The driver works over services it is given (the replica, blobs, who is online, the
doorbell of long polls, the unmask pool, metrics), never over a node; its decisions are
`policy`'s, and what it does with them (commands, waits, logs) is here.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from coordinator import wire
from coordinator.cluster.blobs import BlobService
from coordinator.cluster.metrics import NodeMetrics, StageClock
from coordinator.cluster.presence import OnlineSites, TaskBell
from coordinator.cluster.replica import CommandFailed, Replica
from coordinator.core import commands
from coordinator.core.queries import (
    Fresh,
    budget_keys,
    charge_histories,
    eligible_among,
    identity_keys,
    open_round_cancelled,
    quorum,
    run_unevaluated,
    training_pending,
)
from coordinator.round import policy
from coordinator.round.aggregation import AggregationAbort, InvalidAggregate, make_aggregation
from coordinator.round.charges import ChargePool
from coordinator.round.evaluation import EvalSession, mean_metrics
from coordinator.round.faults import FaultHold
from coordinator.round.hostile import Search
from coordinator.round.late import LateCharges
from coordinator.round.policy import LeaderView
from coordinator.round.schedule import scheduled_lr
from coordinator.round.session import RoundSession
from privacy import secagg
from privacy.plan import plan_round

log = logging.getLogger(__name__)


class RoundDriver:
    def __init__(self, node_id: str, replica: Replica, blobs: BlobService,
                 cluster_size: Callable[[], int], online: OnlineSites, bell: TaskBell,
                 masker: secagg.MaskApplier, metrics: NodeMetrics | None = None,
                 faults: FaultHold | None = None, charges: ChargePool | None = None,
                 paused: Callable[[], bool] = lambda: False) -> None:
        """`paused()` holds the driver between attempts (this node's disk is full)."""
        self.node_id = node_id
        self.replica = replica
        self.blobs = blobs
        self.cluster_size = cluster_size
        self.online = online
        self.bell = bell
        self.masker = masker
        self.metrics = metrics
        self.faults = faults or FaultHold.from_env()
        self.paused = paused
        self.charges = charges or ChargePool()
        self.late = LateCharges(replica, self.charges)
        self.session: RoundSession | None = None
        self.evaluation: EvalSession | None = None  # a finished run's final evaluation
        self._claimed_term: int | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._planning: dict[str, Any] | None = None
        self.search: Search | None = None  # for the site behind an invalid secure sum
        # consecutive times the next round could not even be sampled, and why (the run
        # stops after max_attempts of them, as after that many failed attempts)
        self._unsampled: tuple[int, int, str] = (0, 0, "")

    def stop(self) -> None:
        self.charges.close()
        self._stop.set()
        self._wake.set()

    # ------------------------------------------------------------ called by API threads

    def task_for(self, site: str) -> wire.Task | None:
        """The task of the open stage for `site`, if it is expected and has not answered."""
        ev = self.evaluation
        if ev is not None:  # unless a new run began: the driver is about to drop it
            return None if self.replica.state.read(training_pending) else ev.task(site)
        s = self.session
        if s is None or s.phase != s.agg.sum.stage:
            return None
        if site not in s.agg.sum.expected() or site in s.agg.sum.answered:
            return None
        if time.monotonic() > s.stage_deadline:
            return None
        return s.task(site)

    def accept(self, submit: wire.Submit) -> dict[str, Any]:
        """Take a site's answer to the open stage into the sum, or say why not."""
        if submit.stage == wire.EVAL_STAGE:
            ev = self.evaluation
            reply = ev.accept(submit) if ev else wire.error("stale_round", "no evaluation is open")
            self._wake.set()
            return reply
        s = self.session
        if s is None:
            return wire.error("stale_round", f"round {submit.round}.{submit.attempt} "
                              f"(term {submit.term}) is not open")
        refused = policy.submit_refusal(submit, s.key, s.participants)
        if refused is not None:
            return refused
        if submit.declined is not None:  # kept for the abort reason; nothing else changes
            with s.lock:
                s.declined.setdefault(submit.site, submit.declined)
            return {"ok": True}
        site, summed = submit.site, s.agg.sum
        with s.lock:
            if submit.stage != summed.stage or s.phase != summed.stage:
                return wire.error("wrong_stage", f"the round is at stage {s.phase}, "
                                  f"not {submit.stage!r}")
            if time.monotonic() > s.stage_deadline:
                return wire.error("too_late", f"stage {s.phase} of this round has closed")
            if site not in summed.expected():
                return wire.error("not_expected", f"site {site!r} is not part of stage {s.phase}")
            if site in summed.answered:
                return wire.error("duplicate", "this site already answered this stage")
            summed.accept(site, submit)  # raises WireError; changes nothing then
            if submit.metrics:
                self._start_charge(s, site, dict(submit.metrics))
        # only the driver has new work: no site's task changes until the stage closes,
        # so the long polls are not woken (each accepted answer woke them all: N^2 a stage)
        self._wake.set()
        return {"ok": True}

    def _start_charge(self, s: RoundSession, site: str, metrics: dict[str, float]) -> None:
        """Keep the site's metrics and start its privacy charge off the GIL."""
        s.metrics[site] = metrics
        record = self.replica.state.read(lambda st: st["sites"].get(site))
        if record is not None:
            fut = self.charges.submit(record, metrics)
            if fut is not None:
                s.charge_futures[site] = fut

    def settle(self, site: str, reported: Any) -> list[dict[str, Any]]:
        """The ledger's answers on a site's unsettled DP runs (see `LateCharges.settle`)."""
        return self.late.settle(site, reported)

    def progress(self) -> dict[str, Any] | None:
        s = self.session
        return self._planning if s is None else s.progress()

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except CommandFailed as exc:
                log.warning("driver: %s", exc)
                self._drop_session()
                time.sleep(0.2)
            except Exception:
                log.exception("driver step failed")
                self._drop_session()
                time.sleep(0.5)

    def _leading(self, term: int) -> bool:
        return self.replica.is_leader() and self.replica.term() == term and not self._stop.is_set()

    def _submit(self, command: dict[str, Any], timeout: float = 8.0) -> dict[str, Any]:
        return self.replica.submit(command, timeout=timeout)

    def _notify(self) -> None:
        self.bell.ring()
        self._wake.set()

    def _drop_session(self) -> None:
        if self.session is not None:
            self.session = None
            self.bell.ring()

    def _idle(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    def _step(self) -> None:
        if not self.replica.is_leader():
            self._claimed_term = None
            self._drop_session()
            self._idle(0.05)
            return
        if self.paused():
            self._drop_session()
            self._idle(0.5)
            return
        term = self._claim()
        if term is None:
            return
        view = self.replica.state.read(LeaderView.of)
        if view.open_round is not None:
            rnd = view.open_round
            self._abort(term, rnd["round"], rnd["attempt"], policy.stale_round_reason(rnd, term))
            return
        if self._record_late(term):
            return
        if not view.pending:
            ended = self.replica.state.read(run_unevaluated)
            if ended is not None:
                self._evaluate(term, view, *ended)
            else:
                self._idle(0.2)
            return
        rnd = view.last_round + 1
        reason = policy.give_up(view) or policy.cannot_sample(
            self._unsampled, rnd, view.config.max_attempts)
        if reason is not None:
            self._unsampled = (0, 0, "")
            r = self._submit(commands.stop(reason=reason, node=self.node_id))
            log.error("training stopped: %s (%s)", reason, "recorded" if r["ok"] else r["error"],
                      extra={"event": "training_stopped"})
            return
        self._run_round(term, view)

    def _claim(self) -> int | None:
        """This leader's term, claimed (fenced) once; None when it cannot lead yet."""
        term = self.replica.term()
        if self._claimed_term == term:
            return term
        term = self.replica.leader_term()  # term() may already be a successor's
        if term is None or term == self._claimed_term:
            return None
        self._drop_session()
        r = self._submit(commands.claim(term, self.node_id))
        if not r["ok"]:
            log.warning("claim of term %s refused: %s", term, r["error"])
            time.sleep(0.2)
            return None
        self._claimed_term = term
        log.info("node %s leads term %s", self.node_id, term,
                 extra={"event": "leader_claimed", "term": term})
        return term

    def _record_late(self, term: int) -> bool:
        return self.late.record(term, lambda: self._leading(term), self._submit)

    def _abort(self, term: int, rnd: int, attempt: int, reason: str,
               charges: dict[str, dict[str, float]] | None = None) -> None:
        """Abort an attempt. Sites that already sent their privatized update are charged:
        they spent privacy whether or not the round commits. Sites that declined the
        attempt are named first in the reason."""
        s = self.session
        if s is not None and (s.round, s.attempt) == (rnd, attempt):
            if charges is None:
                charges = self._charges(s, sorted(s.metrics))
            reason = policy.with_declines(reason, s.declined, len(s.participants))
        self._drop_session()
        r = self._submit(commands.round_abort(term, rnd, attempt, reason, charges or {}))
        log.info("round %s.%s aborted (%s): %s", rnd, attempt, reason, r,
                 extra={"event": "round_aborted", "round": rnd, "attempt": attempt, "term": term,
                        "reason": reason, "applied": bool(r.get("ok"))})

    def _evaluate(self, term: int, view: LeaderView, run: str, version: str) -> None:
        """Send a finished run's final model to the online sites and record what they
        report of it. No site online within `online_wait_s` records an empty evaluation:
        a run is evaluated once, not waited on for ever."""
        config = view.config
        deadline = time.monotonic() + config.online_wait_s

        def current() -> bool:  # a new run, or a fresh model, ends the evaluation unrecorded
            return (self._leading(term)
                    and self.replica.state.read(run_unevaluated) == (run, version))

        while not (online := self._online_eligible()):
            if not current():
                return
            if time.monotonic() > deadline:
                break
            self.bell.wait(0.2)
        ev = EvalSession(run=run, version=version, round=view.last_round, term=term,
                         participants=frozenset(online), config=config,
                         federation=view.genesis or "",
                         deadline=time.monotonic() + config.stage_timeout_s)
        self.evaluation = ev
        self._notify()
        try:
            while online and not ev.done():
                if not current():
                    return
                self._idle(0.05)
        finally:
            self.evaluation = None
        with ev.lock:
            reported = dict(ev.reported)
        r = self._submit(commands.run_evaluated(term, run, version, reported,
                                                mean_metrics(reported)))
        log.info("run %s final model %s evaluated by %d of %d sites: %s", run, version[:12],
                 len(reported), len(online), r.get("metrics") if r["ok"] else r["error"],
                 extra={"event": "run_evaluated", "run": run, "version": version,
                        "sites": sorted(reported), "applied": bool(r["ok"])})

    def _online_eligible(self) -> set[str]:
        online = self.online.online()
        return self.replica.state.read(lambda s: Fresh(eligible_among(s, online))).value

    def _sample(self, term: int, view: LeaderView) -> list[str] | None:
        """Wait for enough sites online, then sample; None when leadership was lost."""
        config = view.config
        read = self.replica.state.read
        eligible, keys = read(budget_keys).value
        broke = self.charges.unaffordable(
            keys, lambda stale: read(lambda s: charge_histories(s, stale)).value)
        if eligible == len(broke):
            self._not_sampled(view, "no enrolled site has privacy budget left for another round")
            time.sleep(1.0)
            return None
        want = policy.sample_size(config, eligible - len(broke))
        deadline = time.monotonic() + config.online_wait_s
        while True:
            if not self._leading(term):
                return None
            online = self._online_eligible() - broke
            decision = policy.sampling(len(online), want, config.min_clients,
                                       time.monotonic() > deadline)
            if decision == "sample":
                if self._record_late(term):
                    return None  # budgets changed: sample again from the new ledger
                rng = secrets.SystemRandom()
                search = self.search
                tested = search.sample(online, want, config.min_clients, rng) if search else None
                return tested or policy.choose(online, want, rng)
            if decision == "give_up":
                self._not_sampled(view, f"only {len(online)} of the {want} sites to sample were "
                                        f"online within {config.online_wait_s:g} s "
                                        f"(min_clients {config.min_clients})")
                return None
            self.bell.wait(0.1)

    def _not_sampled(self, view: LeaderView, why: str) -> None:
        rnd = view.last_round + 1
        count = self._unsampled[1] + 1 if self._unsampled[0] == rnd else 1
        self._unsampled = (rnd, count, why)
        log.warning("round %s not started (%d in a row): %s", rnd, count, why,
                    extra={"event": "round_not_sampled", "round": rnd})

    # ------------------------------------------------------------ one attempt

    def _run_round(self, term: int, view: LeaderView) -> None:
        """One attempt, its stages timed: planning counts only if the attempt opened."""
        rnd, attempt = policy.next_attempt(view)
        clock = StageClock(lambda stage, seconds: self._stage_done(
            rnd, attempt, term, stage, seconds))
        clock.enter("planning")
        try:
            session = self._plan(term, view, rnd, attempt)
            if session is not None and self._open(session, view):
                clock.enter(session.agg.sum.stage)
                if self._collect(session, clock):
                    self._finish(session, view, clock)
        finally:
            if clock.stage == "planning":
                clock.discard()
            clock.close()

    def _stage_done(self, rnd: int, attempt: int, term: int, stage: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_stage(stage, seconds)
        log.info("round %s.%s stage %s took %.3fs", rnd, attempt, stage, seconds,
                 extra={"event": "round_stage", "round": rnd, "attempt": attempt, "term": term,
                        "stage": stage, "seconds": round(seconds, 6)})

    def _plan(self, term: int, view: LeaderView, rnd: int, attempt: int) -> RoundSession | None:
        """Sample the participants and build the attempt's session (not yet opened)."""
        participants = self._sample(term, view)
        if participants is None:
            time.sleep(0.1)
            return None
        base_bytes = self.blobs.get(view.head) if view.head else None
        parent_bytes = self.blobs.get(view.parent) if view.parent else None
        if base_bytes is None or (view.parent and parent_bytes is None):
            time.sleep(0.5)
            return None
        base_params = wire.decode_model(base_bytes)
        base_vec = wire.flatten(base_params)
        change = None if parent_bytes is None else (
            base_vec - wire.flatten(wire.decode_model(parent_bytes)))
        seed = secrets.token_hex(16)
        self._planning = {"round": rnd, "attempt": attempt, "stage": "planning"}
        try:
            self.faults.hold("planning", lambda: self._leading(term))
        finally:
            self._planning = None
        config = view.config
        plan = plan_round(federation=view.genesis or "", round_number=rnd, attempt=attempt,
                          term=term, seed_hex=seed, participants=participants,
                          dim=base_vec.size, last_global_change=change, config=config.to_dict())
        keys = self.replica.state.read(lambda s: identity_keys(s, participants))
        return RoundSession(
            round=rnd, attempt=attempt, term=term, base=view.head or "", parent=view.parent,
            seed=seed, base_params=base_params, base_vector=base_vec, participants=frozenset(participants),
            config=config, lr=scheduled_lr(config.lr, config.lr_final, rnd, *view.run),
            agg=make_aggregation(plan, keys, config.server_lr, self.masker),
            opened_at=time.monotonic(), identity_keys=keys, federation=view.genesis or "")

    def _open(self, session: RoundSession, view: LeaderView) -> bool:
        """Commit `round_open` and publish the session to polling sites."""
        s = session
        r = self._submit(commands.round_open(s.term, s.round, s.attempt, s.base,
                                             sorted(s.participants), s.seed))
        if not r["ok"]:
            log.warning("round_open refused: %s", r)
            time.sleep(0.2)
            return False
        s.open_stage()
        self.session = s
        log.info("round %s.%s open with %s", s.round, s.attempt, sorted(s.participants),
                 extra={"event": "round_opened", "round": s.round, "attempt": s.attempt,
                        "term": s.term, "participants": sorted(s.participants)})
        self._notify()
        return True

    def _collect(self, s: RoundSession, clock: StageClock) -> bool:
        """Run the sum's stages, each until every expected site answered or its deadline;
        False when the attempt ended (aborted, or leadership lost)."""
        while True:
            if not self._wait_stage(s):
                self._drop_session()
                return False
            try:
                with s.lock:
                    done = s.agg.sum.close_stage()
                    if not done:
                        s.open_stage()
            except AggregationAbort as exc:
                self._abort(s.term, s.round, s.attempt, policy.failed("aggregation_failed", exc))
                return False
            self._notify()
            if done:
                break
            clock.enter(s.agg.sum.stage)
        reason = policy.too_few(s.agg.sum.survivors(), s.config.min_clients)
        if reason is not None:
            self._abort(s.term, s.round, s.attempt, reason)
            return False
        return True

    def _wait_stage(self, s: RoundSession) -> bool:
        """Wait until the open stage is done; False when leadership was lost meanwhile."""
        while True:
            if not self._leading(s.term):
                return False
            if self.replica.state.read(open_round_cancelled):
                self._abort(s.term, s.round, s.attempt, "run_stopped")
                return False
            with s.lock:
                summed = s.agg.sum
                if policy.stage_done(summed.answered, summed.expected(),
                                     self.faults.holding(s.phase, s.stage_opened),
                                     time.monotonic(), s.stage_deadline):
                    s.phase = "closing"
                    return True
            self._idle(0.05)

    def _finish(self, s: RoundSession, view: LeaderView, clock: StageClock) -> None:
        """Aggregate, replicate the new model to a quorum, commit it."""
        s.phase = "aggregate"
        clock.enter("aggregate")
        try:
            new_vec = s.agg.new_model(s.base_vector)
        except InvalidAggregate as exc:
            self._abort(s.term, s.round, s.attempt, policy.failed("invalid_aggregate", exc))
            self._suspect(s, s.agg.sum.survivors())
            return
        except AggregationAbort as exc:
            self._abort(s.term, s.round, s.attempt, policy.failed("aggregation_failed", exc))
            return
        blob = wire.encode_model(wire.unflatten(new_vec, s.base_params))
        digest = wire.sha256_hex(blob)
        s.phase = "replicate"
        clock.enter("replicate")
        holders = self.blobs.replicate(blob, digest, s.config.replicate_timeout_s)
        cluster_size = self.cluster_size()  # the live Raft membership
        if len(holders) < quorum(cluster_size):
            self._abort(s.term, s.round, s.attempt, "blob_replication_failed")
            return
        s.phase = "commit"
        clock.enter("commit")
        self.faults.hold("commit", lambda: self._leading(s.term))
        survivors = s.agg.sum.survivors()
        charges = self._charges(s, survivors)
        metrics = policy.round_metrics(survivors, s.metrics, time.monotonic() - s.opened_at,
                                       s.agg.plan.k + 1)
        r = self._submit(commands.round_commit(
            s.term, s.round, s.attempt, node=self.node_id, version=digest, parent=s.base,
            size=len(blob), survivors=survivors, metrics=metrics, holders=holders,
            cluster_size=cluster_size, charges=charges,
            site_metrics=policy.site_metrics(survivors, s.metrics)))
        self._drop_session()
        self._committed(s, r, digest, survivors, charges)

    def _committed(self, s: RoundSession, r: dict[str, Any], digest: str, survivors: list[str],
                   charges: dict[str, dict[str, float]]) -> None:
        if r["ok"]:
            if self.search is not None and s.agg.plan.secagg is not None:
                self._narrowed(s, self.search.after_valid(survivors))
            log.info("round %s committed %s", s.round, digest[:12],
                     extra={"event": "round_committed", "round": s.round, "attempt": s.attempt,
                            "term": s.term, "version": digest, "survivors": survivors,
                            "seconds": round(time.monotonic() - s.opened_at, 6)})
            return
        log.warning("round_commit refused: %s", r)
        if r.get("code") == "stopped":  # an operator stopped the run meanwhile
            self._abort(s.term, s.round, s.attempt, "run_stopped", charges)
        elif r.get("code") == "overspend":
            # a site reported a mechanism its budget cannot pay: charge the others and
            # retry the round; the ledger never records an overspend
            budgets = self.replica.state.read(
                lambda st: {x: st["sites"][x]["budget"]["epsilon"] for x in charges})
            self._abort(s.term, s.round, s.attempt, policy.failed("refused", r["error"]),
                        policy.payable(charges, budgets))

    def _suspect(self, s: RoundSession, survivors: list[str]) -> None:
        """An invalid secure sum: start or narrow the search for its sender."""
        self._narrowed(s, Search.start(survivors) if self.search is None
                       else self.search.after_invalid(survivors))

    def _narrowed(self, s: RoundSession, search: Search) -> None:
        """Keep the search, end it, or quarantine the one suspect it has left."""
        culprit = search.culprit()
        self.search = None if culprit or search.over() else search
        if search.over():
            log.warning("no suspect of the invalid secure sum is left: search ended")
            return
        if culprit is None:
            log.warning("round %s.%s: %d suspects of an invalid secure sum left", s.round,
                        s.attempt, len(search.suspects),
                        extra={"event": "invalid_aggregate", "round": s.round,
                               "attempt": s.attempt, "suspects": sorted(search.suspects)})
            return
        reason = (f"behind an invalid secure sum (found at round {s.round}, attempt "
                  f"{s.attempt}): its input was outside what honest clipped inputs can sum to")
        r = self._submit(commands.quarantine(culprit, reason, s.round, s.attempt))
        log.warning("site %s quarantined: %s", culprit, reason if r.get("ok") else r,
                    extra={"event": "site_quarantined", "site": culprit, "round": s.round,
                           "attempt": s.attempt, "applied": bool(r.get("ok"))})

    def _charges(self, s: RoundSession, sites: list[str]) -> dict[str, dict[str, float]]:
        """Each site's charge from the DP parameters it reported, accounted on the ledger.

        epsilon_total is the PRV epsilon of the site's whole recorded history plus this
        round; epsilon is the increase. Deterministic, so an auditor recomputes both.
        The work started in a worker process when the site's masked input arrived.
        """
        out = {}
        for site in sites:
            fut = s.charge_futures.get(site)
            if fut is None:
                continue
            try:
                out[site] = fut.result(timeout=120)
            except Exception as exc:
                log.warning("site %s: no charge computed (%s); reported DP parameters ignored",
                            site, exc)
        return out
