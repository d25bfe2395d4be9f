"""Does heavy aggregation depose the leader? A real 3-node cluster, 100 SecAgg+ sites.

    .venv/bin/python simulations/bench_leader_stall.py [--sites 100] [--dim 1000000]
        [--dropout 0.1] [--rounds 1] [--json]

Three node processes (mTLS on 127.0.0.1, election timeouts 1-2 s) run dense secure
aggregation rounds (compression 1: every one of ``--dim`` coordinates is masked and
unmasked) over ``--sites`` real site agents (``client.agent.Agent``: the fleet API,
SecAgg+ keys, masking, the same code as ``fedraft-client``), hosted as threads of this
one process with a trivial local trainer so the cost is all protocol. ``--dropout`` of
the sites drop out after sharing their keys: the leader must reconstruct their masks
from the survivors' shares, the expensive case (the masked stage then waits out its
``--collect-timeout`` for them, which is most of a round's seconds).

While the rounds run, every node's Raft status is polled every 0.1 s. Reported: leader
changes and term changes (the target is none), each stage's seconds on the leader,
round seconds. The site swarm runs at lower CPU priority (nice 10), so what the nodes
compete with is mostly each other.

``--json`` prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from client.agent import Agent  # noqa: E402
from client.training import EvalResult, FitResult, Parameters  # noqa: E402
from coordinator import wire  # noqa: E402
from coordinator.demo.cluster import LocalCluster  # noqa: E402
from coordinator.ops.admin_client import Refused, Unreachable  # noqa: E402


class ShiftTrainer:
    """Returns the base plus a small site-specific shift: no training cost at all."""

    def __init__(self, dim: int, seed: int) -> None:
        self.dim = dim
        self.rng = np.random.default_rng(seed)

    def initial_parameters(self) -> Parameters:
        return {"w": np.zeros(self.dim, np.float32)}

    def fit(self, params: Parameters, config: Mapping[str, Any]) -> FitResult:
        shift = self.rng.normal(0.0, 0.01, self.dim).astype(np.float32)
        return FitResult({"w": params["w"] + shift}, num_examples=100)

    def evaluate(self, params: Parameters, config: Mapping[str, Any]) -> EvalResult:
        return EvalResult(loss=0.0, num_examples=1, metrics={"accuracy": 0.0})


class DroppingTrainer(ShiftTrainer):
    """A site whose training never ends: it advertises and shares its keys (those stages
    run while it trains) but never sends a masked input, so it drops out there."""

    def fit(self, params: Parameters, config: Mapping[str, Any]) -> FitResult:
        time.sleep(3600)
        raise RuntimeError("unreachable")


def _poll_raft(cluster: LocalCluster, stop: threading.Event, out: dict[str, Any]) -> None:
    leaders: list[str] = []
    terms: set[int] = set()
    while not stop.is_set():
        for n in cluster.nodes:
            try:
                st = cluster.admin.call("Status", endpoint=n.admin)
            except (Unreachable, Refused):
                continue
            raft = st.get("raft", st)
            if raft.get("state") == "leader":
                if not leaders or leaders[-1] != n.id:
                    leaders.append(n.id)
                terms.add(int(raft.get("term", 0)))
        stop.wait(0.1)
    out["leaders"] = leaders
    out["terms"] = sorted(terms)


def run(sites: int, dim: int, dropout: float, rounds: int, quiet: bool,
        collect_s: float = 45.0) -> dict[str, Any]:
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    root = Path(tempfile.mkdtemp(prefix="fedraft-stall-"))
    cluster = LocalCluster(root, num_nodes=3, election=(1.0, 2.0))
    agents: list[Agent] = []
    result: dict[str, Any] = {"sites": sites, "dim": dim, "dropout": dropout}
    try:
        cluster.start_nodes()
        cluster.wait_leader(30)
        names = [f"s{i:03d}" for i in range(sites)]
        t0 = time.monotonic()
        for name in names:
            cluster.add_site(name)
        say(f"enrolled {sites} sites in {time.monotonic() - t0:.1f}s")
        genesis = wire.encode_model({"w": np.zeros(dim, np.float32)})
        cluster.admin.call("InitModel", {"data": genesis})
        os.nice(10)  # the swarm yields the CPU to the node processes
        dropping = set(names[: int(round(dropout * sites))])
        fleet = [n.fleet for n in cluster.nodes]
        for i, name in enumerate(names):
            trainer = DroppingTrainer(dim, i) if name in dropping else ShiftTrainer(dim, i)
            agent = Agent(name, fleet, cluster.site_tls(name), cluster.site_keys[name], trainer,
                          root / "sites" / name / "state", poll_wait_s=5.0)
            agents.append(agent)
            threading.Thread(target=agent.run, daemon=True, name=name).start()
        config = {"fraction": 1.0, "min_clients": max(2, sites - len(dropping) - 1),
                  "compression": 1.0, "secure_aggregation": True, "clip": 0.5,
                  "online_wait_s": 60.0, "collect_timeout_s": collect_s, "stage_timeout_s": 60.0,
                  "error_feedback": False}
        changes_before = cluster.admin.call("Status")["state"]["leader_changes"]
        watch_stop = threading.Event()
        raft: dict[str, Any] = {}
        watcher = threading.Thread(target=_poll_raft, args=(cluster, watch_stop, raft), daemon=True)
        watcher.start()
        stages: dict[str, float] = {}
        t_round = time.monotonic()
        cluster.admin.call("Train", {"rounds": rounds, "config": config})
        last_stage, stage_t = None, time.monotonic()
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            leader = cluster.leader()
            try:
                st = cluster.admin.round_status(endpoint=cluster.admin_of(leader)
                                        if leader else None)
            except (Unreachable, Refused):
                time.sleep(0.2)
                continue
            if st["last_round"] >= rounds:
                if last_stage is not None:  # what ran since the last poll: the round's tail
                    stages[f"{last_stage}+"] = time.monotonic() - stage_t
                break
            stage = (st.get("progress") or {}).get("stage")
            if stage != last_stage:
                now = time.monotonic()
                if last_stage is not None:
                    stages[last_stage] = stages.get(last_stage, 0.0) + now - stage_t
                    say(f"  {last_stage}: {now - stage_t:.2f}s")
                last_stage, stage_t = stage, now
            time.sleep(0.05)
        seconds = time.monotonic() - t_round
        watch_stop.set()
        watcher.join(5)
        st = cluster.admin.round_status()
        committed = [st["history"][str(r)]["committed"] for r in range(1, rounds + 1)
                     if st["history"].get(str(r), {}).get("committed")]
        result |= {
            "rounds_committed": len(committed),
            "survivors": [len(c["survivors"]) for c in committed],
            "aborted_attempts": sum(len(h["aborted"]) for h in st["history"].values()),
            "leader_changes": max(0, len(raft.get("leaders", [])) - 1,
                                  cluster.admin.call("Status")["state"]["leader_changes"]
                                  - changes_before),
            "terms_seen": raft.get("terms", []),
            "stage_seconds": {k: round(v, 3) for k, v in stages.items() if k},
            "seconds": round(seconds, 2),
        }
    finally:
        for a in agents:
            a.stopped.set()
        cluster.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=100)
    p.add_argument("--dim", type=int, default=1_000_000)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--collect-timeout", type=float, default=45.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = run(args.sites, args.dim, args.dropout, args.rounds, quiet=False,
            collect_s=args.collect_timeout)
    print(f"{'sites':>6} {'dim':>9} {'dropout':>7} {'rounds':>6} {'survivors':>9} "
          f"{'aborted':>7} {'leader changes':>14} {'terms':>10} {'seconds':>8}")
    print(f"{r['sites']:>6} {r['dim']:>9} {r['dropout']:>7} {r.get('rounds_committed', 0):>6} "
          f"{str(r.get('survivors')):>9} {r.get('aborted_attempts', '-'):>7} "
          f"{r.get('leader_changes', '-'):>14} {str(r.get('terms_seen')):>10} {r.get('seconds', 0):>8}")
    print("stage seconds on the leader:", r.get("stage_seconds"))
    if args.json:
        print(json.dumps(r))
    return 0 if r.get("rounds_committed") == args.rounds and r.get("leader_changes") == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
