"""Many virtual sites in one process: nearly free while idle, the real agent in a round.

A simulation (`simulations/simulate.py`) runs thousands of sites against a real cluster
without a process, a thread or a gRPC channel per site. `VirtualSites` hosts a share of
them; the simulation makes one per Ray actor, but this module imports no Ray and runs in
any process.

* An idle site is its id and its 32-byte Ed25519 seed. Its durable files
  (`client.store`) are made on disk the first time it takes part, and kept.
* The host keeps `online` of its sites online the way every agent is: a signed long
  `Poll`, here sent as a gRPC future (no thread waits on it) on a channel the host shares
  among at most STREAMS calls (the node admits 32 concurrent streams per connection).
  When the host holds more sites than that, they take turns: a site stays online for
  STINT polls, then the next in line takes its place. The leader thus sees about
  `online` sites at any time, drawn from all of them over the run, and samples among
  those, without every site's poll every few seconds.
* A Poll that brings a round task makes the site active: a real `client.agent.Agent`
  (signatures, the SecAgg+ client, the privacy pipeline, its durable state) on its own
  thread, over a shared channel, until its part in the round ends; then it goes idle.

A site that has just left the online set still counts as online on the leader for its
presence window (8 s) and may be sampled then; so when the host first sees a new session
it looks (a short Poll) for a task for each site that left in the last RECENT_S seconds,
at once and again at each of CATCH_UP_AT_S.

What virtual sites do not do: answer a finished run's final evaluation (the simulation
measures rounds), or report unsettled DP runs while idle (an active agent does).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import shutil
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.agent import Agent, RoundOutcome, retry_after
from client.config import PrivacyConfig
from client.training import EvalResult, FitResult, LocalTrainer, Parameters
from coordinator import wire

log = logging.getLogger(__name__)

STREAMS = 24
"""Calls one shared channel carries at a time; the node admits 32 per connection."""
PRESENCE_WAIT_S = wire.POLL_WAIT_MAX_S
"""How long an idle site's Poll waits on the leader: the longest a node allows."""
STINT = 6
"""Polls a site stays online before the next in line takes its turn (when it has one)."""
RECENT_S = 30.0
"""How long after it left the online set a site is looked at for a new session's task:
the leader's presence window (8 s), plus the time a busy host may take to see the
session's first task."""
CATCH_UP_AT_S = (0.0, 10.0, 20.0)
"""When, after a host first sees a new session, it looks at the sites that left recently
(a look it cannot make in time, under load, is made by the next)."""
UNAVAILABLE_IN_A_ROW = 5
"""Failed polls in a row, with no reply between, before the host tries the next node."""
ACTIVE_LIMIT_S = 300.0
"""An active agent still without an outcome this long after its task is stopped."""
EVAL_BACKOFF_S = 30.0
"""A site offered the run's final evaluation polls again only after this long."""


class StepTrainer:
    """Local training as a small random step from the base: no data, constant cost, so a
    run measures the protocol (agent, privacy pipeline, SecAgg+), not training."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def initial_parameters(self) -> Parameters:
        raise NotImplementedError("a step trainer starts from the cluster's model")

    def fit(self, params: Parameters, config: Any) -> FitResult:
        out = {k: (v + self.rng.normal(0, 0.01, v.shape)).astype(np.float32)
               for k, v in params.items()}
        return FitResult(params=out, num_examples=100, metrics={"train_loss": 0.5})

    def evaluate(self, params: Parameters, config: Any) -> EvalResult:
        return EvalResult(loss=0.5, num_examples=100, metrics={"accuracy": 0.5})


def step_trainer(index: int, state_dir: Path) -> LocalTrainer:
    """The default: a `StepTrainer` seeded by the site's index."""
    return StepTrainer(index)


@dataclass(frozen=True)
class TaskTrainers:
    """Makes a virtual site's trainer for a built-in task (`client.training.tasks`): site
    `index` of `num_sites` gets its share of the task's data and, with `privacy`, trains
    with record-level DP-SGD whose accountant lives in its state dir, as a site of
    `fedraft-client run` does (`client.dp.record_level.site_dp_sgd`)."""

    task: str
    num_sites: int
    privacy: PrivacyConfig | None = None
    split: str = "iid"

    def __call__(self, index: int, state_dir: Path) -> LocalTrainer:
        import torch

        from client.training.tasks import make_trainer

        torch.set_num_threads(1)  # many small trainings share the host's cores
        trainer = make_trainer(self.task, site_index=index, num_sites=self.num_sites,
                               method=self.split, device="cpu")
        if self.privacy is None:
            return trainer
        from client.dp.record_level import site_dp_sgd

        return site_dp_sgd(trainer, self.privacy, state_dir)


class SharedChannel(wire.Channel):
    """A node channel many virtual sites share; `users` counts the calls it carries."""

    users = 0

    def poll_future(self, message: dict[str, Any], timeout: float) -> grpc.Future:
        """A signed Poll sent without a thread waiting on it."""
        stub = self._stubs.get("poll-future")
        if stub is None:
            stub = self._stubs["poll-future"] = self._channel.unary_unary(
                f"/{wire.FLEET_SERVICE}/Poll")
        return stub.future(wire.pack(message), timeout=timeout)


class ChannelPool:
    """Channels to each node, each shared by at most STREAMS calls at a time."""

    def __init__(self, tls: tuple[bytes, bytes, bytes]) -> None:
        self.tls = tls
        self._lock = threading.Lock()
        self._channels: dict[str, list[SharedChannel]] = {}

    def take(self, address: str) -> SharedChannel:
        """The least used channel to `address` (a new one when all carry STREAMS)."""
        with self._lock:
            channels = self._channels.setdefault(address, [])
            best = min(channels, key=lambda c: c.users, default=None)
            if best is None or best.users >= STREAMS:
                best = SharedChannel(address, *self.tls)
                channels.append(best)
            best.users += 1
            return best

    def give(self, channel: SharedChannel) -> None:
        with self._lock:
            channel.users -= 1

    def count(self) -> int:
        with self._lock:
            return sum(len(c) for c in self._channels.values())

    def close(self) -> None:
        """Close every channel; their calls' callbacks run (and `give`) as they end."""
        with self._lock:
            channels = [c for cs in self._channels.values() for c in cs]
            self._channels.clear()
        for c in channels:  # outside the lock: a cancelled call's callback gives back
            c.close()


class Timers:
    """One thread that runs callbacks at their time (a thread per delayed poll would cost
    what the host exists to save)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stopped = False
        threading.Thread(target=self._loop, name="virtual-sites-timers", daemon=True).start()

    def later(self, delay: float, fn: Callable[[], None]) -> None:
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), fn))
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (
                        not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cv.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._stopped:
                    return
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:  # one site's trouble must not stop every site's polls
                log.exception("virtual sites: a scheduled call failed")


def rss_mb() -> dict[str, float]:
    """This process's resident memory now and at its peak, in MB (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out["rss_mb" if line.startswith("VmRSS") else "peak_rss_mb"] = int(line.split()[1]) / 1024
    return out


class VirtualSites:
    """A share of a simulation's sites, hosted in this process (see the module's text).

    `tls` is the host's client identity (CA, certificate, key), shared by its sites: a
    site's own identity is its Ed25519 key, which signs every request. `trainer` makes a
    site's local trainer from its index and state dir when it takes part (`step_trainer`,
    `TaskTrainers`); `root` holds the sites' durable files (default: a temporary
    directory)."""

    def __init__(self, tls: tuple[bytes, bytes, bytes], nodes: list[str],
                 trainer: Callable[[int, Path], LocalTrainer] = step_trainer, root: str = "",
                 seed: int = 0) -> None:
        self.tls = tls
        self.nodes = list(nodes)
        self.trainer = trainer
        self._own_root = not root
        self.root = Path(root or tempfile.mkdtemp(prefix="fedraft-virtual-sites-"))
        self._rng = random.Random(seed)
        self._pool = ChannelPool(tls)
        self._timers = Timers()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._seeds: dict[str, bytes] = {}
        self._index: dict[str, int] = {}
        self._waiting: deque[str] = deque()  # not online, in line for a turn
        self._online: dict[str, int] = {}  # idle and polling: polls left in its stint
        self._agents: dict[str, Agent | None] = {}  # active: in a round
        self._taken: dict[str, list[SharedChannel]] = {}  # the channels each agent holds
        self._recent: dict[str, float] = {}  # left the online set at (monotonic)
        self._sessions: set[str] = set()
        self._leader = self.nodes[0]
        self._unavailable = 0  # polls failed UNAVAILABLE since the last reply
        self.counts: Counter[str] = Counter()
        self.accepted: Counter[int] = Counter()  # round -> sites whose update was taken
        self.activated: Counter[int] = Counter()  # round -> sites that took part

    # ------------------------------------------------------------ the host's surface

    def add_sites(self, sites: list[tuple[str, bytes, int]]) -> int:
        """Host these (site id, Ed25519 private seed, index among all the simulation's
        sites); returns how many it holds."""
        with self._lock:
            for site, seed, index in sites:
                self._index[site] = index
                self._seeds[site] = seed
                self._waiting.append(site)
            return len(self._seeds)

    def start(self, online: int) -> None:
        """Bring `online` sites online (each with a stint of random length, so turns
        spread out over time) and keep that many polling until `stop`."""
        with self._lock:
            line = list(self._waiting)
            self._rng.shuffle(line)
            self._waiting = deque(line)
            first = [self._waiting.popleft() for _ in range(min(online, len(self._waiting)))]
            for site in first:
                self._online[site] = self._rng.randint(1, STINT)
        for site in first:
            self._poll(site, PRESENCE_WAIT_S)

    def stats(self) -> dict[str, Any]:
        """What the host did so far, and its memory."""
        with self._lock:
            out: dict[str, Any] = {
                "hosted": len(self._seeds), "online": len(self._online),
                "active": len(self._agents), "channels": self._pool.count(),
                "threads": threading.active_count(), "counts": dict(self.counts),
                "accepted": {str(k): v for k, v in sorted(self.accepted.items())},
                "activated": {str(k): v for k, v in sorted(self.activated.items())}}
        return out | rss_mb()

    def stop(self) -> dict[str, Any]:
        """Stop polling and every active agent; returns the final `stats`."""
        self._stopped.set()
        with self._lock:
            agents = list(self._agents.values())
        for agent in agents:
            if agent is not None:
                agent.stopped.set()
        self._timers.stop()
        out = self.stats()
        self._pool.close()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
        return out

    # ------------------------------------------------------------ idle: presence polls

    def _key(self, site: str) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self._seeds[site])

    def _poll(self, site: str, wait: float, catch_up: int = 0) -> None:
        """Send `site`'s Poll as a future; `_polled` takes the reply. A catch-up poll
        (`catch_up` tries left) is one short look for a task, not a presence poll."""
        if self._stopped.is_set():
            return
        address = self._leader
        channel = self._pool.take(address)
        try:
            msg = wire.sign({"site": site, "wait": wait}, self._key(site))
            future = channel.poll_future(msg, timeout=wait + 10.0)
        except Exception:
            self._pool.give(channel)
            raise
        with self._lock:
            self.counts["polls"] += 1
        future.add_done_callback(
            lambda f: self._polled(site, address, channel, f, catch_up))

    def _polled(self, site: str, address: str, channel: SharedChannel, future: grpc.Future,
                catch_up: int) -> None:
        self._pool.give(channel)
        if self._stopped.is_set():
            return
        try:
            reply = wire.unpack(future.result())
        except (grpc.RpcError, grpc.FutureCancelledError) as exc:
            code = exc.code().name if isinstance(exc, grpc.RpcError) else "CANCELLED"
            self._count(f"poll_failed_{code}")
            log.info("poll for %s at %s failed (%s)", site, address, code)
            if code == "UNAVAILABLE":  # that node is down: the next one (a late reply: again)
                self._next_node(address)
            if not catch_up:
                self._timers.later(0.5, lambda: self._poll(site, PRESENCE_WAIT_S))
            elif catch_up > 1:
                self._timers.later(0.5, lambda: self._poll(site, 0.0, catch_up - 1))
            return
        self._unavailable = 0
        try:
            self._answer(site, address, reply, catch_up)
        except Exception:
            log.exception("virtual site %s: reply not handled", site)
            self._count("errors")

    def _answer(self, site: str, address: str, reply: dict[str, Any], catch_up: int) -> None:
        """What an idle site does with its Poll's reply."""
        def again() -> None:  # a presence poll goes on; a catch-up tries while it may
            if not catch_up:
                self._poll(site, PRESENCE_WAIT_S)
            elif catch_up > 1:
                self._poll(site, 0.0, catch_up - 1)

        if not reply.get("ok"):
            code = reply.get("code")
            self._count(f"refused_{code}")
            if code == "rate_limited":
                self._timers.later(retry_after(reply), again)
            elif code in wire.TRY_NEXT_NODE:
                self._next_node(address, at_once=True)
                self._timers.later(0.2, again)
            elif code in ("unenrolled", "revoked", "bad_signature", "forbidden"):
                log.error("virtual site %s refused: %s", site, reply.get("error"))
                with self._lock:
                    self._online.pop(site, None)  # it never polls again
            else:
                self._timers.later(1.0, again)
            return
        status = reply.get("status")
        if status == "redirect":
            leader = reply.get("leader")
            if leader and leader != address:
                self._leader = leader
            else:
                self._next_node(address, at_once=True)
            self._timers.later(0.0 if leader else 0.2, again)
        elif status == "task":
            self._task(site, reply.get("task"), again)
        elif not catch_up:
            self._idle(site)

    def _idle(self, site: str) -> None:
        """An idle reply: poll again, or, its stint over, hand the turn to the next site."""
        with self._lock:
            left = self._online.get(site, 1) - 1
            if left > 0 or not self._waiting:
                self._online[site] = max(left, 1)
                nxt = site
            else:
                self._online.pop(site, None)
                self._recent[site] = time.monotonic()
                self._waiting.append(site)
                nxt = self._waiting.popleft()
                self._online[nxt] = STINT
        self._poll(nxt, PRESENCE_WAIT_S)

    def _next_node(self, failed: str, at_once: bool = False) -> None:
        """Move the host's polls on from `failed`: at once when it said so, else after
        UNAVAILABLE_IN_A_ROW failed calls with no reply between (one may be a connection
        the node let go idle)."""
        with self._lock:
            self._unavailable += 1
            if self._leader != failed or not (
                    at_once or self._unavailable >= UNAVAILABLE_IN_A_ROW):
                return
            self._unavailable = 0
            i = self.nodes.index(failed) if failed in self.nodes else -1
            self._leader = self.nodes[(i + 1) % len(self.nodes)]

    def _count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.counts[what] += n

    # ------------------------------------------------------------ a task: the real agent

    def _task(self, site: str, raw: Any, again: Callable[[], None]) -> None:
        """A round task for `site`: make it active (an EVAL task is left unanswered)."""
        stage = raw.get("stage") if isinstance(raw, dict) else None
        if stage == wire.EVAL_STAGE:
            self._count("evaluations_skipped")
            self._timers.later(EVAL_BACKOFF_S, again)
            return
        try:
            task = wire.Task.from_wire(raw)
        except wire.WireError as exc:
            log.error("malformed task for %s: %s", site, exc)
            self._timers.later(1.0, again)
            return
        with self._lock:
            if site in self._agents:
                return
            new = task.session not in self._sessions
            self._sessions.add(task.session)
            self.activated[task.round] += 1
            self._online.pop(site, None)
            if site in self._waiting:
                self._waiting.remove(site)
            self._agents[site] = None  # active; its agent is made on its own thread
            self.counts["activated"] += 1
        threading.Thread(target=self._run_agent, args=(site,), daemon=True,
                         name=f"virtual-{site}").start()
        if new:  # now, and twice more while the session's first stages run
            for delay in CATCH_UP_AT_S:
                self._timers.later(delay, self._catch_up)

    def _catch_up(self) -> None:
        """Poll once, at once, for every site that left the online set so recently that
        the leader may have sampled it for the session that just opened."""
        now = time.monotonic()
        with self._lock:
            self._recent = {s: t for s, t in self._recent.items() if now - t < RECENT_S}
            sites = [s for s in self._recent if s not in self._agents and s not in self._online]
        self._count("catch_up_polls", len(sites))
        for site in sites:
            self._poll(site, 0.0, catch_up=3)

    def _agent(self, site: str) -> Agent:
        """The site's real agent, over channels the host shares (given back at its end)."""
        nodes = [self._leader, *(n for n in self.nodes if n != self._leader)]
        with self._lock:
            taken: list[SharedChannel] = self._taken.setdefault(site, [])

        def connect(address: str) -> SharedChannel:
            taken.append(self._pool.take(address))
            return taken[-1]

        def outcome(o: RoundOutcome) -> None:
            with self._lock:
                self.counts["accepted" if o.accepted else "not_accepted"] += 1
                if o.accepted:
                    self.accepted[o.round] += 1
            agent.stopped.set()  # its part in the round is over, however it ended

        trainer = self.trainer(self._index[site], self.root / site)
        agent = Agent(site, nodes, self.tls, self._key(site), trainer, self.root / site,
                      poll_wait_s=5.0, on_round=outcome, connect=connect)
        return agent

    def _run_agent(self, site: str) -> None:
        """Make the site's agent and run it until its round outcome (or ACTIVE_LIMIT_S),
        then idle again."""
        try:
            agent = self._agent(site)
            with self._lock:
                self._agents[site] = agent
            if self._stopped.is_set():
                agent.stopped.set()
            self._timers.later(ACTIVE_LIMIT_S, agent.stopped.set)
            agent.run(max_rounds=1)
        except PermissionError as exc:
            log.error("virtual site %s refused: %s", site, exc)
            self._count("errors")
        except Exception:
            log.exception("virtual site %s: the agent failed", site)
            self._count("errors")
        with self._lock:
            for channel in self._taken.pop(site, []):
                self._pool.give(channel)
            self._agents.pop(site, None)
            if self._stopped.is_set():
                return
            self._online[site] = 1  # one idle poll, then its turn passes on
        self._poll(site, PRESENCE_WAIT_S)
