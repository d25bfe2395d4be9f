"""Rounds with many sites: a real 3-node cluster, SecAgg+ on, compression 10.

    .venv/bin/python simulations/bench_scale.py [--sites 10,100,200] [--rounds 3]
        [--dim 10000] [--swarms 2] [--json]

For each site count n: a fresh cluster (mTLS, real node processes, the default node
configuration), n enrolled sites, a genesis model of --dim float32 coordinates, and n
real site agents (`client.agent.Agent`: signatures, SecAgg+ client, sparsification, error
feedback) run as threads of --swarms processes, each with a trivial local trainer
(`client.virtual_sites.StepTrainer`: the update is a small random step, so the cost is the
protocol's, not training's). `simulate.py` runs many more sites, on Ray actors. The run asks
for --rounds rounds with every site sampled and reports, per n: the median round seconds
(the leader's own `seconds` metric of each committed round), the leader's CPU seconds per
round (utime + stime over the run of the busiest node, the leader, divided by the
rounds), leader changes during the run, and the largest peak RSS of the nodes.

Flower rows (its simulation of n trivial NumPy clients, --flower 100,1000) need
`flwr[simulation]` (Ray); without it they are left out and the table says so.

`--json` prints one JSON object as the last line: {"rows": [{system, sites, rounds,
round_s_median, leader_cpu_s_per_round, leader_changes, leader_peak_rss_mb}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from client.virtual_sites import StepTrainer  # noqa: E402
from coordinator import wire  # noqa: E402
from coordinator.demo.cluster import LocalCluster  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- one swarm process


def swarm(spec_path: str) -> int:
    """Run the agents a spec file names, one thread each, until SIGTERM."""
    from client.agent import Agent

    spec = json.loads(Path(spec_path).read_text())
    ca = Path(spec["ca"]).read_bytes()
    agents = []
    for i, site in enumerate(spec["sites"]):
        d = Path(spec["root"]) / "sites" / site
        key = serialization.load_pem_private_key((d / "identity.pem").read_bytes(), None)
        tls = (ca, (d / "tls" / f"{site}.pem").read_bytes(), (d / "tls" / f"{site}.key").read_bytes())
        agents.append(Agent(site, spec["nodes"], tls, key, StepTrainer(i), d / "state",  # type: ignore[arg-type]
                            poll_wait_s=5.0))
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
    for t in threads:
        t.start()
    try:
        while True:
            time.sleep(1.0)
    finally:
        for a in agents:
            a.stopped.set()


# ---------------------------------------------------------------- the driver


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_run(c: LocalCluster, target: int, deadline: float) -> dict[str, Any]:
    """Round status once `target` is committed, the run stopped, or the deadline passed."""
    while True:
        st = c.newest_status()
        if st["last_round"] >= target or st.get("stopped") or time.monotonic() > deadline:
            return c.round_status()  # every round's history, paged
        time.sleep(1.0)


def run_fedraft(n: int, rounds: int, dim: int, swarms: int, root: Path) -> dict[str, Any]:
    c = LocalCluster(root, num_nodes=3, election=(1.0, 2.0))
    procs: list[subprocess.Popen] = []
    try:
        c.start_nodes()
        c.wait_leader(60)
        t0 = time.monotonic()
        for i in range(n):
            c.add_site(f"s{i:05d}")
        log(f"n={n}: {n} sites enrolled in {time.monotonic() - t0:.1f} s")
        genesis = root / "genesis.safetensors"
        genesis.write_bytes(wire.encode_model({"w": np.zeros(dim, np.float32)}))
        c.admin.call("InitModel", {"data": genesis.read_bytes()})
        sites = [f"s{i:05d}" for i in range(n)]
        for k in range(swarms):
            spec = root / f"swarm-{k}.json"
            spec.write_text(json.dumps({"root": str(root), "ca": str(c.ca_dir / "ca.pem"),
                                        "nodes": [x.fleet for x in c.nodes],
                                        "sites": sites[k::swarms]}))
            with open(root / f"swarm-{k}.log", "ab") as fh:
                procs.append(subprocess.Popen([sys.executable, __file__, "--swarm", str(spec)],
                                              stdout=fh, stderr=subprocess.STDOUT))
        c.wait_leader(30)
        pids = {k: p.popen.pid for k, p in c.node_procs.items()}  # type: ignore[union-attr]
        before = c.admin.round_status()
        changes0 = before["leader_changes"]
        cpu0 = {k: cpu_seconds(pid) for k, pid in pids.items()}
        t1 = time.monotonic()
        c.admin.call("Train", {"rounds": rounds, "config": {
            "clients": n, "min_clients": max(2, n // 2), "compression": 10.0,
            "secure_aggregation": True, "online_wait_s": 300.0, "max_attempts": 3}})
        st = wait_run(c, before["last_round"] + rounds, deadline=time.monotonic() + 600 + n)
        wall = time.monotonic() - t1
        # the busiest node's CPU: the leader's, even when leadership moved during the run
        cpu = max(cpu_seconds(pid) - cpu0[k] for k, pid in pids.items())
        committed = [(st["history"].get(str(r)) or {}).get("committed")
                     for r in range(1, rounds + 1)]
        seconds = [x["metrics"]["seconds"] for x in committed if x]
        aborts = [a["reason"] for r in range(1, rounds + 1)
                  for a in (st["history"].get(str(r)) or {}).get("aborted", [])]
        return {"system": "fedraft", "sites": n, "rounds": len(seconds),
                "round_s_median": round(statistics.median(seconds), 3) if seconds else None,
                "leader_cpu_s_per_round": round(cpu / max(1, len(seconds)), 3),
                "leader_changes": st["leader_changes"] - changes0,
                "leader_peak_rss_mb": round(max(peak_rss_mb(pid) for pid in pids.values()), 1),
                "survivors_min": min((len(x["survivors"]) for x in committed if x), default=0),
                "aborted_attempts": aborts, "stopped": st.get("stopped"),
                "wall_s": round(wall, 1)}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        c.stop()


def flower_simulation(n: int, rounds: int, dim: int, out: str) -> int:
    """In its own process: Flower's simulation (Ray backend) of n NumPy clients that add a
    small random step, FedAvg over all n each round; writes each round's end time."""
    import logging

    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        rng = np.random.default_rng()
        step = [(a + rng.normal(0, 0.01, a.shape)).astype(np.float32) for a in arrays]
        content = RecordDict({"arrays": ArrayRecord(step),
                              "metrics": MetricRecord({"num-examples": 100, "train_loss": 0.5})})
        return Message(content=content, reply_to=msg)

    ends: list[float] = []

    class TimedFedAvg(FedAvg):
        def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
            result = super().aggregate_train(server_round, replies)
            ends.append(time.monotonic())
            return result

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                               min_available_nodes=n)
        ends.append(time.monotonic())
        strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(dim, np.float32)]),
                       num_rounds=rounds)

    run_simulation(server_app=server, client_app=client, num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    Path(out).write_text(json.dumps(ends))
    return 0


def run_flower(n: int, rounds: int, dim: int, root: Path) -> dict[str, Any] | None:
    """Flower's own simulation of n trivial NumPy clients, if flwr[simulation] is here."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return None
    out = root / f"flower-{n}.json"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, "--flower-sim", f"{n},{rounds},{dim},{out}"],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 or not out.exists():
        log(f"flower n={n} failed: {proc.stderr[-2000:]}")
        return None
    ends = json.loads(out.read_text())
    seconds = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return {"system": "flower", "sites": n, "rounds": len(seconds),
            "round_s_median": round(statistics.median(seconds), 3) if seconds else None,
            "leader_cpu_s_per_round": None, "leader_changes": None, "leader_peak_rss_mb": None,
            "wall_s": round(time.monotonic() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", default="10,100,200")
    ap.add_argument("--flower", default="100,1000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dim", type=int, default=10_000)
    ap.add_argument("--swarms", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--swarm", help=argparse.SUPPRESS)
    ap.add_argument("--flower-sim", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.swarm:
        return swarm(args.swarm)
    if args.flower_sim:
        n, r, d, out = args.flower_sim.split(",", 3)
        return flower_simulation(int(n), int(r), int(d), out)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for n in (int(x) for x in args.sites.split(",") if x):
        root = Path(tempfile.mkdtemp(prefix=f"fedraft-scale-{n}-"))
        try:
            rows.append(run_fedraft(n, args.rounds, args.dim, args.swarms, root))
            log(f"n={n}: {rows[-1]}")
        finally:
            shutil.rmtree(root, ignore_errors=True)
    for n in (int(x) for x in args.flower.split(",") if x):
        root = Path(tempfile.mkdtemp(prefix=f"fedraft-scale-flower-{n}-"))
        try:
            row = run_flower(n, args.rounds, args.dim, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        if row is None:
            notes.append(f"flower n={n}: skipped (flwr[simulation] / Ray not installed)")
        else:
            rows.append(row)
    cols = ("system", "sites", "rounds", "round_s_median", "leader_cpu_s_per_round",
            "leader_changes", "leader_peak_rss_mb")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(k)) for k in cols))
    for note in notes:
        print(note)
    if args.json:
        print(json.dumps({"rows": rows, "notes": notes, "dim": args.dim}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
