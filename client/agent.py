"""The site agent: follow the leader, take round tasks, hand them to the round's work, send.

This module is the connection and the loop: channels to the listed nodes, moving to the
next one when a node dies, following a follower's redirect to the leader, Poll / Submit /
GetBlob, the small cache of models, and settling the DP runs the leader confirms. What
one round attempt does (train, privatize, persist, answer each stage) is
`client.round_work`; the files it keeps are `client.store`. Only `coordinator.wire` (the
public schema) is imported from the coordinator. Which round attempts the site already
answered is kept on disk, so a restarted agent never feeds a second update into a
session it already joined; so are the DP runs its accountant charged that the leader has
not yet confirmed on the replicated ledger, reported until it does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.round_work import BudgetRefusal, RoundWork, Site, final_evaluation
from client.store import RESIDUAL_FILE, DurableState
from client.training import LocalTrainer, Parameters
from coordinator import wire
from privacy import secagg

log = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    """How this site's part in a round attempt ended (for `on_round` callers: tests, demos)."""

    round: int
    attempt: int
    accepted: bool
    detail: str


def retry_after(reply: dict[str, Any], default: float = 1.0, most: float = 5.0) -> float:
    """Seconds to wait before calling again after a ``rate_limited`` refusal: the node's
    ``retry_after_s`` within [0, most]; ``default`` when it sent none or not a number."""
    retry = reply.get("retry_after_s")
    retry = retry if isinstance(retry, int | float) else default
    return max(0.0, min(float(retry), most))  # NaN gives 0.0


class Agent:
    """One site's connection to the federation and its loop over round tasks.

    `trainer` trains locally; `state_dir` holds the site's durable files (`client.store`).
    `on_round` is told how each of the site's round attempts ended. `connect` makes the
    channel to a node address (default: a channel of the site's own); a host of many
    virtual sites passes channels they share (`client.virtual_sites`).
    """

    def __init__(
        self,
        site_id: str,
        nodes: list[str],
        tls: tuple[bytes, bytes, bytes],
        identity_key: Ed25519PrivateKey,
        trainer: LocalTrainer,
        state_dir: Path,
        poll_wait_s: float = 5.0,
        on_round: Callable[[RoundOutcome], None] | None = None,
        connect: Callable[[str], wire.Channel] | None = None,
    ) -> None:
        self.site_id = site_id
        self.nodes = list(nodes)
        self.tls = tls
        self.key = identity_key
        self.trainer = trainer
        self.state = DurableState(state_dir)
        self.poll_wait_s = poll_wait_s
        self.on_round = on_round
        self._channels: dict[str, wire.Channel] = {}
        self._connect = connect or (lambda address: wire.Channel(address, *self.tls))
        self._current = 0
        self._leader_hint: str | None = None
        self._model_cache: dict[str, Parameters] = {}
        self._work: RoundWork | None = None
        self._evaluated: set[str] = set()  # final-evaluation sessions answered
        self.residual_path = Path(state_dir) / RESIDUAL_FILE
        self._site = Site(site_id, identity_key, trainer, self.state, self.residual_path)
        self.stopped = threading.Event()

    # ------------------------------------------------------------ connection

    def _channel(self, address: str) -> wire.Channel:
        if address not in self._channels:
            self._channels[address] = self._connect(address)
        return self._channels[address]

    def _address(self) -> str:
        return self._leader_hint or self.nodes[self._current % len(self.nodes)]

    def _next_node(self) -> None:
        self._leader_hint = None
        self._current += 1

    def _call(self, method: str, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        msg = wire.sign({"site": self.site_id, **message}, self.key)
        return self._channel(self._address()).call(wire.FLEET_SERVICE, method, msg,
                                                   timeout=timeout)

    # ------------------------------------------------------------ main loop

    def run(self, max_rounds: int | None = None) -> None:
        """Poll and answer tasks until stopped (or `max_rounds` rounds are done); raises
        PermissionError when the federation refuses the site (unenrolled, revoked)."""
        done, backoff, failures = 0, 0.2, 0
        while not self.stopped.is_set() and (max_rounds is None or done < max_rounds):
            try:
                reply = self._call("Poll", {"wait": self.poll_wait_s, **self._unsettled()},
                                   timeout=self.poll_wait_s + 5)
                backoff, failures = 0.2, 0
                self._settle(reply)
            except grpc.RpcError as exc:
                log.info("node %s unreachable (%s); trying the next", self._address(),
                         exc.code().name)
                self._next_node()
                failures += 1
                # The next node may well be up (one died, the rest elect a leader): try it
                # at once; back off only once every listed node has failed in a row.
                if failures % len(self.nodes):
                    self.stopped.wait(0.05)
                else:
                    self.stopped.wait(backoff)
                    backoff = min(backoff * 2, 2.0)
                continue
            if not reply.get("ok"):
                code = reply.get("code")
                if code == "rate_limited":  # the node says when to call again: often ms, not 1 s
                    log.info("rate limited by %s: %s", self._address(), reply.get("error"))
                    self.stopped.wait(retry_after(reply))
                    continue
                if code in wire.TRY_NEXT_NODE:  # that node takes no work now
                    log.warning("%s: %s; trying the next node", self._address(), reply.get("error"))
                    self._next_node()
                    self.stopped.wait(0.2)
                    continue
                log.error("refused by %s: %s (%s)", self._address(), reply.get("error"), code)
                if code in ("unenrolled", "revoked", "bad_signature", "forbidden"):
                    raise PermissionError(f"{code}: {reply.get('error')}")
                self.stopped.wait(1.0)
                continue
            status = reply["status"]
            if status == "redirect":
                leader = reply.get("leader")
                if leader and leader != self._address():
                    self._leader_hint = leader
                else:
                    self._next_node()
                    self.stopped.wait(0.2)
            elif status == "task":
                if self._do_task(reply.get("task")):
                    done += 1

    def _do_task(self, raw: Any) -> bool:
        """Answer one stage of a round; True when this site's part of the round is done."""
        try:
            task = wire.Task.from_wire(raw)
        except wire.WireError as exc:  # the leader's bug, not a reason to stop the site
            log.error("malformed task from %s skipped: %s", self._address(), exc)
            self.stopped.wait(1.0)
            return False
        key = task.session
        if task.stage == wire.EVAL_STAGE:
            self._evaluate(task)
            return False
        work = self._work
        if work is None or work.key != key:
            if self.state.joined(key):
                # Never feed a second update into a session we already joined.
                self.stopped.wait(0.5)
                return False
            work = self._start_work(task)
            if work is None:
                return False
        stage = task.stage
        try:
            body = work.answer(task)
        except (secagg.ProtocolAbort, secagg.InvalidMessage, secagg.StageError) as exc:
            log.warning("round %s: leaving the session at %s: %s", key, stage, exc)
            self._work = None
            return False
        except BudgetRefusal as exc:
            log.error("round %s refused: %s", key, exc)
            self._decline(task, exc)
            self._finish(work, RoundOutcome(task.round, task.attempt, False, str(exc)))
            return False
        reply = self._submit(body)
        accepted = bool(reply.get("ok"))
        if not accepted:
            log.warning("round %s stage %s: %s: %s", key, stage, reply.get("code"),
                        reply.get("error"))
        last_stage = stage in ("collect", "unmask") or not accepted
        if last_stage:
            detail = "accepted" if accepted else f"{reply.get('code')}: {reply.get('error')}"
            log.info("round %s.%s: %s", task.round, task.attempt, detail)
            self._finish(work, RoundOutcome(task.round, task.attempt, accepted, detail))
        return accepted and last_stage

    def _decline(self, task: wire.Task, why: BaseException) -> None:
        """Tell the leader this site takes no part in the attempt, and why, so that the
        attempt's abort (and a run that stops over it) names the real cause."""
        self._submit(wire.Submit(site=self.site_id, round=task.round, attempt=task.attempt,
                                 term=task.term, stage=task.stage,
                                 declined=str(why)[:200] or type(why).__name__).to_wire())

    def _evaluate(self, task: wire.Task) -> None:
        """Report how a finished run's final model does on this site's records, once."""
        if task.session in self._evaluated:
            self.stopped.wait(0.5)
            return
        self._evaluated.add(task.session)
        base = self._fetch_model(task.base)
        if base is None:
            return
        try:
            body = final_evaluation(self._site, task, base)
        except Exception as exc:  # the site's own code or data: say so, keep serving
            log.error("final evaluation of %s failed: %s", task.base[:12], exc)
            return
        reply = self._submit(body)
        log.info("final model %s evaluated: %s (%s)", task.base[:12], body["metrics"],
                 "accepted" if reply.get("ok") else reply.get("error"))

    def _unsettled(self) -> dict[str, Any]:
        runs = self.state.unsettled()
        return {"unsettled": runs} if runs else {}

    def _settle(self, reply: dict[str, Any]) -> None:
        """Forget the DP runs the leader's `ledger` answers settle."""
        answers: dict[tuple[int, int], str] = {}
        for a in reply.get("ledger") or ():
            if (isinstance(a, dict) and type(a.get("round")) is int
                    and type(a.get("attempt")) is int and a.get("status") in wire.LEDGER_SETTLED):
                answers[(a["round"], a["attempt"])] = a["status"]
        if not answers:
            return
        for run, status in self.state.settle(answers):
            if status == "charged":
                log.info("DP run of %s.%s is charged on the ledger", run["round"], run["attempt"])
            else:  # the site's accountant counts a run the ledger never will
                log.warning("DP run of %s.%s is settled as %s: the ledger does not charge it",
                            run["round"], run["attempt"], status)

    def _finish(self, work: RoundWork, outcome: RoundOutcome) -> None:
        self._work = None
        if self.on_round:
            self.on_round(outcome)

    def _start_work(self, task: wire.Task) -> RoundWork | None:
        base = self._fetch_model(task.base)
        parent = self._fetch_model(task.parent) if task.parent else None
        if base is None or (task.parent and parent is None):
            return None
        site = self._site
        try:
            self._work = RoundWork(site, task, base, parent)
        except BudgetRefusal as exc:
            log.error("round %s refused: %s", task.session, exc)
            self.state.mark_joined(task.session)  # do not reconsider this session
            self._decline(task, exc)
            if self.on_round:
                self.on_round(RoundOutcome(task.round, task.attempt, False, str(exc)))
            return None
        return self._work

    def _submit(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send to the leader; the same update may be resent only to the same session."""
        for _ in range(3):
            try:
                reply = self._call("Submit", {**message, **self._unsettled()}, timeout=30)
            except grpc.RpcError as exc:
                return {"ok": False, "code": "unreachable", "error": exc.code().name}
            self._settle(reply)
            if reply.get("code") == "not_leader" and reply.get("leader"):
                self._leader_hint = reply["leader"]
                continue
            if reply.get("code") == "rate_limited":  # nothing was taken: wait, send again
                self.stopped.wait(retry_after(reply))
                continue
            return reply
        return {"ok": False, "code": "no_leader", "error": "could not reach the leader"}

    def _fetch_model(self, digest: str) -> Parameters | None:
        if digest in self._model_cache:
            return self._model_cache[digest]
        for _ in range(len(self.nodes) + 1):
            try:
                reply = self._call("GetBlob", {"hash": digest}, timeout=30)
            except grpc.RpcError:
                self._next_node()
                continue
            if reply.get("ok") and wire.sha256_hex(reply["data"]) == digest:
                params = wire.decode_model(reply["data"])
                if len(self._model_cache) >= 3:
                    self._model_cache.pop(next(iter(self._model_cache)))
                self._model_cache[digest] = params
                return params
            log.warning("node %s has no valid blob %s", self._address(), digest[:12])
            self._next_node()
        return None
