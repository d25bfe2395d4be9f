"""The site agent: follow the leader, take round tasks, train locally, send the update.

Only `coordinator.wire` (the public schema) is imported from the coordinator. The agent
talks to whichever listed node answers; a follower's redirect names the leader. When a
node dies the agent moves to the next one by itself. Which round attempts it already
answered is kept on disk, so a restarted agent never feeds a second update into a
session it already joined; so are the DP runs its accountant charged that the leader has
not yet confirmed on the replicated ledger, reported until it does.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.training import FitResult, LocalTrainer
from coordinator import wire
from privacy import secagg
from privacy.plan import RoundPlan, encode_update, make_round_plan, sparsify_update

log = logging.getLogger(__name__)


def load_identity_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def write_identity_key(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return key


class DurableState:
    """Small JSON state in the site's state dir, replaced atomically.

    `joined`: the sessions this site fed an update (invariant 5). `unsettled`: DP runs the
    site's own accountant charged that the leader has not yet confirmed on the replicated
    ledger; they are reported with every request until it does, so that a run whose
    update died with its leader is still charged there (`wire.unsettled_run`).
    """

    MAX_UNSETTLED_KEPT = 100

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "agent-state.json"
        self.data: dict[str, Any] = {"joined": [], "unsettled": []}
        if self.path.exists():
            self.data.update(json.loads(self.path.read_text()))
        self._lock = threading.Lock()  # training threads record runs

    def joined(self, key: str) -> bool:
        return key in self.data["joined"]

    def mark_joined(self, key: str) -> None:
        with self._lock:
            self.data["joined"] = (self.data["joined"] + [key])[-1000:]
            self._save()

    def unsettled(self) -> list[dict[str, Any]]:
        """The newest runs to report, at most what the leader reads of one request."""
        with self._lock:
            return [dict(e) for e in self.data["unsettled"][-wire.MAX_UNSETTLED:]]

    def add_unsettled(self, run: dict[str, Any]) -> None:
        with self._lock:
            runs = [e for e in self.data["unsettled"]
                    if (e["round"], e["attempt"]) != (run["round"], run["attempt"])]
            if len(runs) >= self.MAX_UNSETTLED_KEPT:
                log.warning("forgetting unsettled DP run %s.%s: more than %d wait for the "
                            "ledger", runs[0]["round"], runs[0]["attempt"], self.MAX_UNSETTLED_KEPT)
            self.data["unsettled"] = [*runs, run][-self.MAX_UNSETTLED_KEPT:]
            self._save()

    def settle(self, answers: dict[tuple[int, int], str]) -> list[tuple[dict[str, Any], str]]:
        """Forget the runs the leader answered; returns them with the answers."""
        with self._lock:
            done = [(e, answers[(e["round"], e["attempt"])]) for e in self.data["unsettled"]
                    if (e["round"], e["attempt"]) in answers]
            if done:
                self.data["unsettled"] = [e for e in self.data["unsettled"]
                                          if (e["round"], e["attempt"]) not in answers]
                self._save()
            return done

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            json.dump(self.data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


@dataclass
class RoundOutcome:
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
        self._current = 0
        self._leader_hint: str | None = None
        self._model_cache: dict[str, dict] = {}
        self._work: RoundWork | None = None
        self.residual_path = Path(state_dir) / "residual.npy"
        self.stopped = threading.Event()

    # ------------------------------------------------------------ connection

    def _channel(self, address: str) -> wire.Channel:
        if address not in self._channels:
            self._channels[address] = wire.Channel(address, *self.tls)
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
                if self._do_task(reply["task"]):
                    done += 1

    def _do_task(self, task: dict[str, Any]) -> bool:
        """Answer one stage of a round; True when this site's part of the round is done."""
        key = f"{task['round']}.{task['attempt']}.{task['term']}"
        work = self._work
        if work is None or work.key != key:
            if self.state.joined(key):
                # Never feed a second update into a session we already joined.
                self.stopped.wait(0.5)
                return False
            work = self._start_work(key, task)
            if work is None:
                return False
        stage = task["stage"]
        try:
            body = work.answer(task)
        except (secagg.ProtocolAbort, secagg.InvalidMessage, secagg.StageError) as exc:
            log.warning("round %s: leaving the session at %s: %s", key, stage, exc)
            self._work = None
            return False
        except BudgetRefusal as exc:
            log.error("round %s refused: %s", key, exc)
            self._finish(work, RoundOutcome(task["round"], task["attempt"], False, str(exc)))
            return False
        if body is None:
            return False
        reply = self._submit({"round": task["round"], "attempt": task["attempt"],
                              "term": task["term"], "stage": stage, **body})
        accepted = bool(reply.get("ok"))
        if not accepted:
            log.warning("round %s stage %s: %s: %s", key, stage, reply.get("code"),
                        reply.get("error"))
        last_stage = stage in ("collect", "unmask") or not accepted
        if last_stage:
            detail = "accepted" if accepted else f"{reply.get('code')}: {reply.get('error')}"
            log.info("round %s.%s: %s", task["round"], task["attempt"], detail)
            self._finish(work, RoundOutcome(task["round"], task["attempt"], accepted, detail))
        return accepted and last_stage

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

    def _start_work(self, key: str, task: dict[str, Any]) -> RoundWork | None:
        base = self._fetch_model(task["base"])
        parent = self._fetch_model(task["parent"]) if task.get("parent") else None
        if base is None or (task.get("parent") and parent is None):
            return None
        try:
            self._work = RoundWork(self, key, task, base, parent)
        except BudgetRefusal as exc:
            log.error("round %s refused: %s", key, exc)
            self.state.mark_joined(key)  # do not reconsider this session
            if self.on_round:
                self.on_round(RoundOutcome(task["round"], task["attempt"], False, str(exc)))
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

    def _fetch_model(self, digest: str) -> dict | None:
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


class BudgetRefusal(Exception):
    """The site's own privacy budget cannot pay for this round; it does not take part."""


def load_residual(path: Path, dim: int) -> np.ndarray | None:
    if not path.exists():
        return None
    residual = np.load(path)
    return residual if residual.shape == (dim,) else None


def save_residual(path: Path, residual: np.ndarray | None) -> None:
    if residual is None:
        return
    tmp = path.with_name(".residual.tmp.npy")
    with open(tmp, "wb") as fh:
        np.save(fh, residual)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class RoundWork:
    """This site's part in one round attempt: training runs in the background while the
    key stages go on; the privatized update is computed once and fed to one session.

    Pipeline, in order: DP-SGD inside local training -> update minus base -> plus the
    error-feedback residual -> projection onto the public index set -> per-coordinate
    clip (the clipped part returns to the residual) -> fixed-point encode with the
    weight appended -> mask.
    """

    def __init__(self, agent: Agent, key: str, task: dict[str, Any], base: dict,
                 parent: dict | None) -> None:
        self.agent = agent
        self.key = key
        self.base = base
        self.base_vec = wire.flatten(base)
        change = None if parent is None else self.base_vec - wire.flatten(parent)
        cfg = task["config"]
        self.plan: RoundPlan = make_round_plan(
            federation=task["federation"], round_number=task["round"], attempt=task["attempt"],
            term=task["term"], seed=bytes.fromhex(task["seed"]), participants=task["participants"],
            dim=self.base_vec.size, last_global_change=change, compression=cfg["compression"],
            clip=cfg["clip"], max_weight=cfg["max_examples"], secure=cfg["secure_aggregation"],
            threshold=cfg["threshold"], error_feedback=cfg["error_feedback"],
            residual_decay=cfg.get("residual_decay", 1.0))
        self.client: secagg.SecAggClient | None = None
        if self.plan.secagg is not None:
            keys = {s: bytes.fromhex(k) for s, k in task["identity_keys"].items()}
            self.client = secagg.SecAggClient(self.plan.secagg, agent.site_id, agent.key, keys,
                                              os.urandom)
        self.config = {k: cfg[k] for k in ("local_epochs", "lr", "batch_size")} | {
            "round": task["round"]}
        self.session = {k: task[k] for k in ("round", "attempt", "term")}
        preview = getattr(agent.trainer, "preview_charge", None)
        if preview is not None:
            cost = preview(self.config)
            spent, budget = agent.trainer.epsilon_spent, agent.trainer.epsilon_budget
            if spent + cost.epsilon > budget + 1e-9:
                raise BudgetRefusal(f"this round costs epsilon {cost.epsilon:.3f}; spent "
                                    f"{spent:.3f} of {budget:.3f}: the site declines")
        self._fit: FitResult | None = None
        self._error: BaseException | None = None
        self._metrics: dict[str, float] = {}
        self._done = threading.Event()
        threading.Thread(target=self._train, name=f"train-{key}", daemon=True).start()

    def _train(self) -> None:
        try:
            t0 = time.monotonic()
            ev = self.agent.trainer.evaluate(self.base, self.config)
            self._fit = self.agent.trainer.fit(self.base, self.config)
            self._record_run(self._fit.metrics)
            self._metrics = {"eval_accuracy": float(ev.metrics.get("accuracy", 0.0)),
                             "eval_loss": float(ev.loss),
                             "train_seconds": round(time.monotonic() - t0, 3)}
            # DP parameters travel in the clear: the ledger needs them to charge the site
            self._metrics.update({k: float(v) for k, v in self._fit.metrics.items()
                                  if k == "train_loss" or k.startswith("dp_")})
        except BaseException as exc:  # surfaced to the stage that needs the result
            self._error = exc
        finally:
            self._done.set()

    def _record_run(self, metrics: dict[str, float]) -> None:
        """The DP run just charged by the site's accountant, unsettled until the leader
        confirms a ledger charge for it (its update may die with the leader)."""
        if all(f"dp_{k}" in metrics for k in wire.UNSETTLED_DP):
            self.agent.state.add_unsettled(
                self.session | {k: float(metrics[f"dp_{k}"]) for k in wire.UNSETTLED_DP})

    def _privatized(self, timeout: float) -> tuple[Any, dict[str, float]]:
        if not self._done.wait(timeout):
            raise secagg.ProtocolAbort("local training did not finish before the deadline")
        if self._error is not None:
            if self._error.__class__.__name__ == "BudgetExceeded":
                raise BudgetRefusal(str(self._error))
            raise self._error
        assert self._fit is not None
        delta = (wire.flatten(self._fit.params).astype(np.float64) - self.base_vec)
        residual = load_residual(self.agent.residual_path, self.plan.dim)
        update = sparsify_update(delta, residual, self.plan, self._fit.num_examples)
        # Invariant 5: this update is fed to this session and no other.
        self.agent.state.mark_joined(self.key)
        save_residual(self.agent.residual_path, update.residual)
        return update, dict(self._metrics)

    def answer(self, task: dict[str, Any]) -> dict[str, Any] | None:
        stage = task["stage"]
        wait = max(1.0, float(task.get("deadline_s", 30.0)) - 0.5)
        if stage == "collect":
            update, metrics = self._privatized(wait)
            return {"update": wire.encode_update(update.values.astype(np.float32)),
                    "num_examples": int(self._fit.num_examples), "metrics": metrics}  # type: ignore[union-attr]
        if self.client is None:
            raise secagg.StageError(f"stage {stage!r} in a round without secure aggregation")
        if stage == "advertise":
            return {"secagg": self.client.advertise().to_wire()}
        if stage == "share":
            directory = secagg.KeyDirectory.from_wire(task["directory"])
            return {"secagg": self.client.share_keys(directory).to_wire()}
        if stage == "masked":
            request = secagg.MaskedInputRequest.from_wire(task["request"])
            update, metrics = self._privatized(wait)
            words = encode_update(update, self.plan, np.random.default_rng(
                int.from_bytes(os.urandom(8), "little")))
            return {"secagg": self.client.masked_input(request, words).to_wire(),
                    "metrics": metrics}
        if stage == "unmask":
            request = secagg.UnmaskRequest.from_wire(task["request"])
            return {"secagg": self.client.unmask(request).to_wire()}
        raise secagg.StageError(f"unknown stage {stage!r}")
