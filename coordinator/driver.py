"""The leader-only round driver: claim, plan, collect, aggregate, replicate, commit.

Every step that matters is a fenced command carrying this leader's term; the driver's
own memory (the open session and its running sum) dies with its leadership. A new
leader first claims its term, then aborts any round it did not open itself and runs
that round again as a new attempt: a round is never half-committed.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coordinator import state as sm
from coordinator import wire
from coordinator.aggregate import ServerSGD
from coordinator.aggregation import AggregationAbort, PlainAggregation, SecureAggregation
from coordinator.ledger import CHARGE_FIELDS, ChargeCalculator
from coordinator.metrics import StageClock
from coordinator.replica import CommandFailed
from coordinator.schedule import scheduled_lr
from privacy.plan import RoundPlan, make_round_plan

if TYPE_CHECKING:
    from coordinator.node import Node

log = logging.getLogger(__name__)

FAULT_HOLD_ENV = "FEDRAFT_FAULT_HOLD"
"""Tests only: a file holding `stage:seconds` makes the leader linger at that stage."""
TASK_KEYS = ("local_epochs", "lr", "batch_size", "secure_aggregation", "compression",
             "error_feedback", "clip", "max_examples", "threshold", "residual_decay")
TRAINING_STAGES = ("collect", "masked")


@dataclass
class RoundSession:
    """What the leader alone knows about the round it opened."""

    round: int
    attempt: int
    term: int
    base: str
    parent: str | None
    seed: str
    base_vector: np.ndarray
    participants: frozenset[str]
    config: dict[str, Any]
    agg: PlainAggregation | SecureAggregation
    opened_at: float
    identity_keys: dict[str, str] = field(default_factory=dict)
    federation: str = ""
    stage_deadline: float = 0.0
    stage_opened: float = 0.0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    charge_futures: dict[str, Future] = field(default_factory=dict)
    phase: str = "collect"  # the aggregation's stage, then aggregate/replicate/commit
    lock: threading.Lock = field(default_factory=threading.Lock)

    def task(self, site: str) -> dict[str, Any]:
        return {
            "federation": self.federation,
            "round": self.round, "attempt": self.attempt, "term": self.term,
            "base": self.base, "parent": self.parent, "seed": self.seed,
            "participants": sorted(self.participants), "stage": self.agg.stage,
            "deadline_s": max(0.0, self.stage_deadline - time.monotonic()),
            "config": {k: self.config[k] for k in TASK_KEYS},
            "identity_keys": self.identity_keys,
            **self.agg.payload_for(site),
        }

    def open_stage(self) -> None:
        key = "collect_timeout_s" if self.agg.stage in TRAINING_STAGES else "stage_timeout_s"
        self.stage_opened = time.monotonic()
        self.stage_deadline = self.stage_opened + self.config[key]
        self.phase = self.agg.stage


class RoundDriver:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.session: RoundSession | None = None
        self.charges = ChargeCalculator()
        self._claimed_term: int | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._planning: dict[str, Any] | None = None
        self._hold_file = os.environ.get(FAULT_HOLD_ENV)
        self._late: dict[tuple[str, int, int], dict[str, Any]] = {}  # runs to charge late
        self._late_lock = threading.Lock()
        self.metrics = getattr(node, "metrics", None)  # coordinator.metrics.NodeMetrics

    def stop(self) -> None:
        self.charges.close()
        self._stop.set()
        self._wake.set()

    # ------------------------------------------------------------ called by API threads

    def task_for(self, site: str) -> dict[str, Any] | None:
        s = self.session
        if s is None or s.phase != s.agg.stage:
            return None
        if site not in s.agg.expected() or site in s.agg.answered:
            return None
        if time.monotonic() > s.stage_deadline:
            return None
        return s.task(site)

    def accept_update(self, site: str, msg: dict[str, Any]) -> dict[str, Any]:
        s = self.session
        key = (msg.get("round"), msg.get("attempt"), msg.get("term"))
        if s is None or key != (s.round, s.attempt, s.term):
            return wire.error("stale_round", f"round {key[0]}.{key[1]} (term {key[2]}) is not open")
        if site not in s.participants:
            return wire.error("not_participant", f"site {site!r} was not sampled this round")
        try:
            metrics = sm.validate_metrics(msg.get("metrics", {}))
        except sm.Rejected as exc:
            return wire.error(exc.code, exc.message)
        with s.lock:
            if msg.get("stage") != s.agg.stage or s.phase != s.agg.stage:
                return wire.error("wrong_stage", f"the round is at stage {s.phase}, "
                                  f"not {msg.get('stage')!r}")
            if time.monotonic() > s.stage_deadline:
                return wire.error("too_late", f"stage {s.phase} of this round has closed")
            if site not in s.agg.expected():
                return wire.error("not_expected", f"site {site!r} is not part of stage {s.phase}")
            if site in s.agg.answered:
                return wire.error("duplicate", "this site already answered this stage")
            s.agg.accept(site, msg)  # raises WireError; changes nothing then
            if metrics:
                s.metrics[site] = metrics
                record = self.node.replica.state.read(lambda st: st["sites"].get(site))
                if record is not None:
                    fut = self.charges.submit(record, metrics)
                    if fut is not None:
                        s.charge_futures[site] = fut
        with self.node.tasks_changed:
            self.node.tasks_changed.notify_all()
        self._wake.set()
        return {"ok": True}

    def settle(self, site: str, reported: Any) -> list[dict[str, Any]]:
        """The ledger's answer on the DP runs a site reports as unsettled (its accountant
        charged them; see `wire.unsettled_run`): `charged`, `uncharged` or `invalid` for
        each run the site may forget. A run in an attempt aborted without its charge is
        queued for `late_charge` and stays unanswered until that applies."""
        if not isinstance(reported, list):
            return []
        runs: dict[tuple[int, int], dict[str, Any] | None] = {}
        for raw in reported[:wire.MAX_UNSETTLED]:
            run = wire.unsettled_run(raw)
            if run is not None:
                runs[(run["round"], run["attempt"])] = run
            elif isinstance(raw, dict) and all(
                    type(raw.get(k)) is int for k in ("round", "attempt")):
                runs[(raw["round"], raw["attempt"])] = None
        statuses = self.node.replica.state.read(
            lambda st: {k: sm.charge_status(st, site, *k) for k in runs})
        answers = []
        for (rnd, attempt), run in runs.items():
            status = "invalid" if run is None else statuses[(rnd, attempt)]
            if run is not None and status == "chargeable":
                with self._late_lock:
                    self._late.setdefault((site, rnd, attempt), run)
            elif status != "pending":
                answers.append({"round": rnd, "attempt": attempt, "status": status})
        return answers

    def progress(self) -> dict[str, Any] | None:
        s = self.session
        if s is None:
            return self._planning
        return {"round": s.round, "attempt": s.attempt, "stage": s.phase,
                "participants": sorted(s.participants), "submitted": sorted(s.agg.answered),
                "expected": sorted(s.agg.expected()),
                "seconds": round(time.monotonic() - s.opened_at, 2)}

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
        return self.node.replica.is_leader() and self.node.replica.term() == term

    def _submit(self, command: dict[str, Any], timeout: float = 8.0) -> dict[str, Any]:
        return self.node.replica.submit(command, timeout=timeout)

    def _drop_session(self) -> None:
        if self.session is not None:
            self.session = None
            with self.node.tasks_changed:
                self.node.tasks_changed.notify_all()

    def _step(self) -> None:
        replica = self.node.replica
        if not replica.is_leader():
            self._claimed_term = None
            self._drop_session()
            self._wake.wait(0.05)
            self._wake.clear()
            return
        term = replica.term()
        if self._claimed_term != term:
            term = replica.leader_term()  # term() may already be a successor's
            if term is None or term == self._claimed_term:
                return
            self._drop_session()
            r = self._submit({"op": "claim", "term": term, "node": self.node.id})
            if not r["ok"]:
                log.warning("claim of term %s refused: %s", term, r["error"])
                time.sleep(0.2)
                return
            self._claimed_term = term
            log.info("node %s leads term %s", self.node.id, term,
                     extra={"event": "leader_claimed", "term": term})
        st = replica.state.read(lambda s: {
            "round": s["round"], "pending": sm.training_pending(s), "last": sm.last_round(s),
            "attempts": dict(s["attempts"]), "config": s["training"]["config"],
            "run": (s["training"].get("first_round", 1), s["training"]["target_round"]),
            "sites": sm.eligible_sites(s), "head": sm.head(s),
            "parent": s["versions"][-1]["parent"] if s["versions"] else None,
            "genesis": s["versions"][0]["hash"] if s["versions"] else None,
            "keys": {k: v["public_key"] for k, v in s["sites"].items()},
        })
        open_round = st["round"]
        if open_round is not None:
            # Rounds run synchronously in this thread, so any round still open here was
            # opened by an earlier leader (or an earlier, failed step): retry it afresh.
            self._abort(term, open_round["round"], open_round["attempt"],
                        "leader_change" if open_round["term"] != term else "driver_restart")
            return
        if self._settle_late(term):
            return
        if not st["pending"]:
            self._wake.wait(0.2)
            self._wake.clear()
            return
        self._run_round(term, st)

    def _abort(self, term: int, rnd: int, attempt: int, reason: str,
               charges: dict[str, dict[str, float]] | None = None) -> None:
        """Abort an attempt. Sites that already sent their privatized update are charged:
        they spent privacy whether or not the round commits."""
        s = self.session
        if charges is None and s is not None and (s.round, s.attempt) == (rnd, attempt):
            charges = self._charges(s, sorted(s.metrics))
        self._drop_session()
        r = self._submit({"op": "round_abort", "term": term, "round": rnd, "attempt": attempt,
                          "reason": reason, "charges": charges or {}})
        log.info("round %s.%s aborted (%s): %s", rnd, attempt, reason, r,
                 extra={"event": "round_aborted", "round": rnd, "attempt": attempt, "term": term,
                        "reason": reason, "applied": bool(r.get("ok"))})

    def _settle_late(self, term: int) -> bool:
        """Record the late charges sites reported (`settle`); True when any applied.

        Runs in the driver thread between attempts only: every charge is computed over its
        site's current history and applied before the next is computed, and none can slip
        between an open attempt's charge (computed when the update arrived) and its commit.
        """
        with self._late_lock:
            pending, self._late = self._late, {}
        applied = False
        for (site, rnd, attempt), run in pending.items():
            if not self._leading(term) or self._stop.is_set():
                break
            status, record = self._late_view(site, rnd, attempt)
            if status != "chargeable" or record is None:
                continue
            fut = self.charges.submit(record, {f"dp_{k}": run[k] for k in CHARGE_FIELDS})
            if fut is None:
                continue
            try:
                charge = fut.result(timeout=120)
            except Exception as exc:
                log.warning("site %s: late charge for %s.%s not computed (%s)", site, rnd,
                            attempt, exc)
                continue
            seen = len(record["charges"])
            r = self._submit({"op": "late_charge", "term": term, "round": rnd,
                              "attempt": attempt, "site": site, "prior_charges": seen,
                              "charge": charge,
                              "request_id": f"late-charge:{site}:{rnd}.{attempt}:{term}:{seen}"})
            applied = applied or bool(r.get("ok"))
            extra = {"event": "late_charge", "site": site, "round": rnd, "attempt": attempt,
                     "term": term, "applied": bool(r.get("ok")),
                     "epsilon_total": charge["epsilon_total"]}
            if r.get("overspent"):
                log.error("site %s: late charge for %s.%s takes it to epsilon %.4g, OVER its "
                          "budget: recorded, since the site has spent it", site, rnd, attempt,
                          charge["epsilon_total"], extra=extra | {"overspent": True})
            elif r.get("ok"):
                log.info("site %s charged late for %s.%s: %s", site, rnd, attempt, charge,
                         extra=extra)
            else:
                log.warning("late charge of %s for %s.%s refused: %s", site, rnd, attempt, r,
                            extra=extra)
        return applied

    def _late_view(self, site: str, rnd: int, attempt: int) -> tuple[str, dict[str, Any] | None]:
        return self.node.replica.state.read(
            lambda st: (sm.charge_status(st, site, rnd, attempt), st["sites"].get(site)))

    def _sample(self, term: int, st: dict[str, Any]) -> list[str] | None:
        """Wait for enough sites online, then sample; None when leadership was lost."""
        config = st["config"]
        records = self.node.replica.state.read(
            lambda s: {x: s["sites"][x] for x in st["sites"]})
        eligible = self.charges.affordable(records)
        if not eligible:
            log.warning("no enrolled site has privacy budget left for another round")
            time.sleep(1.0)
            return None
        want = config["clients"] or math.ceil(config["fraction"] * len(eligible))
        want = max(config["min_clients"], min(want, len(eligible)))
        deadline = time.monotonic() + config["online_wait_s"]
        while True:
            if not self._leading(term) or self._stop.is_set():
                return None
            online = sorted(self.node.online.online() & eligible)
            late = time.monotonic() > deadline
            if len(online) >= want or (late and len(online) >= config["min_clients"]):
                if self._settle_late(term):
                    return None  # budgets changed: sample again from the new ledger
                k = min(want, len(online))
                return sorted(secrets.SystemRandom().sample(online, k))
            if late:
                log.warning("only %d of %d sites online; waiting", len(online), want)
                return None
            with self.node.tasks_changed:
                self.node.tasks_changed.wait(0.1)

    def _blob(self, digest: str) -> bytes | None:
        if self.node.blobs.has(digest) or self.node.fetch_from_peers(digest):
            return self.node.blobs.get(digest)
        log.warning("model %s is on no reachable peer yet", digest[:12])
        return None

    def _run_round(self, term: int, st: dict[str, Any]) -> None:
        """One attempt, its stages timed: planning counts only if the attempt opened."""
        rnd = st["last"] + 1
        attempt = st["attempts"].get(rnd, 0) + 1
        clock = StageClock(lambda stage, seconds: self._stage_done(
            rnd, attempt, term, stage, seconds))
        clock.enter("planning")
        try:
            self._run_attempt(term, st, rnd, attempt, clock)
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

    def _run_attempt(self, term: int, st: dict[str, Any], rnd: int, attempt: int,
                     clock: StageClock) -> None:
        config = dict(st["config"])
        config["lr"] = scheduled_lr(config["lr"], config["lr_final"], rnd, *st["run"])
        participants = self._sample(term, st)
        if participants is None:
            time.sleep(0.1)
            return
        base_bytes = self._blob(st["head"])
        parent_bytes = self._blob(st["parent"]) if st["parent"] else None
        if base_bytes is None or (st["parent"] and parent_bytes is None):
            time.sleep(0.5)
            return
        base_params = wire.decode_model(base_bytes)
        base_vec = wire.flatten(base_params)
        change = None if parent_bytes is None else (
            base_vec - wire.flatten(wire.decode_model(parent_bytes)))
        seed = secrets.token_hex(16)
        self._planning = {"round": rnd, "attempt": attempt, "stage": "planning"}
        try:
            self._hold("planning", term)
        finally:
            self._planning = None
        plan = round_plan(st["genesis"], rnd, attempt, term, seed, participants, base_vec.size,
                          change, config)
        if config["secure_aggregation"]:
            agg: PlainAggregation | SecureAggregation = SecureAggregation(
                plan, {p: st["keys"][p] for p in participants}, self.node.mask_pool)
        else:
            agg = PlainAggregation(plan, frozenset(participants))
        session = RoundSession(
            round=rnd, attempt=attempt, term=term, base=st["head"], parent=st["parent"],
            seed=seed, base_vector=base_vec, participants=frozenset(participants),
            config=config, agg=agg, opened_at=time.monotonic(),
            identity_keys={p: st["keys"][p] for p in participants}, federation=st["genesis"])
        r = self._submit({"op": "round_open", "term": term, "round": rnd, "attempt": attempt,
                          "base": st["head"], "participants": participants, "seed": seed})
        if not r["ok"]:
            log.warning("round_open refused: %s", r)
            time.sleep(0.2)
            return
        session.open_stage()
        self.session = session
        clock.enter(session.agg.stage)
        log.info("round %s.%s open with %s", rnd, attempt, participants,
                 extra={"event": "round_opened", "round": rnd, "attempt": attempt, "term": term,
                        "participants": participants})
        self._notify()

        # the aggregation's stages, each until every expected site answered or its deadline
        while True:
            while True:
                if not self._leading(term) or self._stop.is_set():
                    self._drop_session()
                    return
                with session.lock:
                    if ((session.agg.answered >= session.agg.expected()
                         and not self._holding(session))
                            or time.monotonic() > session.stage_deadline):
                        session.phase = "closing"
                        break
                self._wake.wait(0.05)
                self._wake.clear()
            try:
                with session.lock:
                    done = session.agg.close_stage()
                    if not done:
                        session.open_stage()
            except AggregationAbort as exc:
                self._abort(term, rnd, attempt, f"aggregation_failed: {exc}"[:200])
                return
            self._notify()
            if done:
                break
            clock.enter(session.agg.stage)
        survivors = session.agg.survivors()
        if len(survivors) < config["min_clients"]:
            self._abort(term, rnd, attempt,
                        f"too_few_updates ({len(survivors)}/{config['min_clients']})")
            return

        # aggregate, replicate, commit
        session.phase = "aggregate"
        clock.enter("aggregate")
        try:
            mean_delta = session.agg.mean_delta()
        except AggregationAbort as exc:
            self._abort(term, rnd, attempt, f"aggregation_failed: {exc}"[:200])
            return
        new_vec = ServerSGD(config["server_lr"])(base_vec, mean_delta)
        blob = wire.encode_model(wire.unflatten(new_vec, base_params))
        digest = wire.sha256_hex(blob)
        session.phase = "replicate"
        clock.enter("replicate")
        holders = self.node.replicate_blob(blob, digest, config["replicate_timeout_s"])
        cluster_size = self.node.membership.cluster_size()  # the live Raft membership
        if len(holders) < sm.quorum(cluster_size):
            self._abort(term, rnd, attempt, "blob_replication_failed")
            return
        session.phase = "commit"
        clock.enter("commit")
        self._hold("commit", term)
        charges = self._charges(session, survivors)
        r = self._submit({
            "op": "round_commit", "term": term, "round": rnd, "attempt": attempt,
            "node": self.node.id, "version": digest, "parent": st["head"], "size": len(blob),
            "survivors": survivors, "metrics": self._metrics(session, survivors),
            "holders": holders, "cluster_size": cluster_size,
            "charges": charges,
        })
        self._drop_session()
        if r["ok"]:
            log.info("round %s committed %s", rnd, digest[:12],
                     extra={"event": "round_committed", "round": rnd, "attempt": attempt,
                            "term": term, "version": digest, "survivors": survivors,
                            "seconds": round(time.monotonic() - session.opened_at, 6)})
        else:
            log.warning("round_commit refused: %s", r)
            if r.get("code") == "overspend":
                # a site reported a mechanism its budget cannot pay: charge the others
                # and retry the round; the ledger never records an overspend
                budgets = self.node.replica.state.read(
                    lambda st: {x: st["sites"][x]["budget"]["epsilon"] for x in charges})
                self._abort(term, rnd, attempt, f"refused: {r['error']}"[:200],
                            {k: v for k, v in charges.items()
                             if v["epsilon_total"] <= budgets[k] + 1e-9})

    # ------------------------------------------------------------ fault injection (tests)

    def _hold_spec(self) -> tuple[str, float] | None:
        """`stage:seconds` from the file named by FEDRAFT_FAULT_HOLD, re-read each time so
        one cluster can be held at each stage in turn; unset in production."""
        if not self._hold_file:
            return None
        try:
            stage, _, seconds = Path(self._hold_file).read_text().strip().partition(":")
            return stage, float(seconds)
        except (OSError, ValueError):
            return None

    def _hold(self, stage: str, term: int) -> None:
        """Stay at `stage` for the configured seconds, so a test can kill the leader there."""
        spec = self._hold_spec()
        if spec is None or spec[0] != stage:
            return
        log.warning("fault injection: holding at %s for %.1fs", stage, spec[1])
        deadline = time.monotonic() + spec[1]
        while time.monotonic() < deadline and self._leading(term) and not self._stop.is_set():
            time.sleep(0.05)

    def _holding(self, session: RoundSession) -> bool:
        spec = self._hold_spec()
        return (spec is not None and spec[0] == session.phase
                and time.monotonic() < session.stage_opened + spec[1])

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

    def _notify(self) -> None:
        with self.node.tasks_changed:
            self.node.tasks_changed.notify_all()

    @staticmethod
    def _metrics(s: RoundSession, survivors: list[str]) -> dict[str, float]:
        """Federated evaluation of the base and training loss, averaged over survivors.

        Example counts never travel in the clear (they are inside the masked vector), so
        site metrics are averaged without weights.
        """
        out: dict[str, float] = {
            "survivors": float(len(survivors)),
            "seconds": round(time.monotonic() - s.opened_at, 3),
            "upload_values": float(s.agg.plan.k + 1),
        }
        reported = [s.metrics[site] for site in survivors if site in s.metrics]
        for name, key in (("eval_accuracy", "base_accuracy"), ("eval_loss", "base_loss"),
                          ("train_loss", "train_loss")):
            values = [m[name] for m in reported if name in m]
            if values:
                out[key] = sum(values) / len(values)
        return out


def round_plan(federation: str, rnd: int, attempt: int, term: int, seed: str,
               participants: list[str], dim: int, change: np.ndarray | None,
               config: dict[str, Any]) -> RoundPlan:
    """The public plan of a round, exactly as every site derives it from its task."""
    return make_round_plan(
        federation=federation, round_number=rnd, attempt=attempt, term=term,
        seed=bytes.fromhex(seed), participants=participants, dim=dim,
        last_global_change=change, compression=config["compression"], clip=config["clip"],
        max_weight=config["max_examples"], secure=config["secure_aggregation"],
        threshold=config["threshold"], error_feedback=config["error_feedback"],
        residual_decay=config["residual_decay"])
