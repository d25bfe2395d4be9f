"""Rounds of a real cluster with thousands of virtual sites hosted on Ray actors.

    .venv/bin/python simulations/simulate.py [--sites 10000] [--per-round 1000]
        [--rounds 3] [--address RAY_ADDRESS] [--actors N] [--online N] [--dim 10000]
        [--task step|digits_small|...] [--epsilon E] [--stage-timeout 60] [--logs DIR]
        [--json]

Needs Ray: `pip install -e '.[sim]'` (without it: one line, exit 2).

A real 3-node cluster (`LocalCluster`: node processes, mTLS, Raft) is started here and
--sites sites are enrolled with their own Ed25519 identity keys. The sites are spread
over --actors Ray actors (default: one per CPU of the Ray cluster), each a
`client.virtual_sites.VirtualSites` host: an idle site is its key and, while online, one
long Poll in flight on a channel the actor shares; a site the leader samples runs the real
`client.agent.Agent` (signatures, SecAgg+ client, the privacy pipeline, durable state)
until its part in the round ends. It trains with --task: `step` (a random step, no data:
the protocol's cost, not training's) or a built-in task on its share of the data, with
record-level DP-SGD and a budget of --epsilon on the ledger when given. About --online
sites are online at any time (default: twice --per-round, at most --sites); they take
turns, so all sites come online during a run. The run asks for --rounds rounds of
--per-round sites, SecAgg+ on, compression 10, with --stage-timeout per key stage (the
node's 20 s is for sites with a machine each; here they share the cores).

--address names a running Ray cluster (`ray start --head` on one machine, `ray start
--address ...` on the others, fedraft installed on each): the actors spread over its
machines, and the nodes then bind --bind (an address those machines reach). Without it
Ray runs on this machine and stops at the end.

Reported: seconds per round (the leader's `seconds` of each committed round, and the
wall time between commits, to within the 1 s it is polled at), participants and
survivors per round, the peak total memory of this run's processes on this machine (the
nodes, Ray's own processes when it started them, the actors: RSS summed, and PSS, which
counts shared pages once), and the memory per idle virtual site (an actor's RSS with its
sites online and idle, less its RSS before it held any, divided by its sites). `--json`
prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from coordinator import wire  # noqa: E402
from coordinator.cluster import pki  # noqa: E402
from coordinator.demo.cluster import LocalCluster  # noqa: E402
from coordinator.ops.admin_client import AdminClient, OperatorConfig  # noqa: E402

NEEDS_RAY = "fedraft simulate needs Ray: pip install -e '.[sim]'"
SIM_LIMITS = "\n[limits]\n# virtual sites share their host's certificate: no per-certificate rate limit\n" \
             "fleet_rps = 0.0\nadmin_rps = 0.0\n"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- memory on this machine


def _descendants(root: int) -> list[int]:
    """Every process below `root` (Ray's raylet and its workers, the nodes)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB; (0, 0) once it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    values = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines()[1:]
              if line.split(":")[0] in ("Rss", "Pss")}
    return values.get("Rss", 0), values.get("Pss", 0)


class MemoryWatch:
    """Samples, once a second, the summed RSS and PSS of this process and all below it."""

    def __init__(self) -> None:
        self.peak_rss_mb = 0.0
        self.peak_pss_mb = 0.0
        self.last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def sample(self) -> dict[str, float]:
        pids = [os.getpid(), *_descendants(os.getpid())]
        rss, pss = map(sum, zip(*(_memory_kb(p) for p in pids), strict=True))
        self.last = {"rss_mb": rss / 1024, "pss_mb": pss / 1024, "processes": len(pids)}
        self.peak_rss_mb = max(self.peak_rss_mb, rss / 1024)
        self.peak_pss_mb = max(self.peak_pss_mb, pss / 1024)
        return self.last

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# ---------------------------------------------------------------- the cluster and sites


def start_cluster(root: Path, bind: str) -> LocalCluster:
    """A 3-node cluster with the per-certificate rate limits off (see SIM_LIMITS)."""
    c = LocalCluster(root, num_nodes=3, election=(1.0, 2.0),
                     hosts=[bind] * 3 if bind != "127.0.0.1" else None)
    for node in c.nodes:
        with open(root / node.id / "node.toml", "a") as fh:
            fh.write(SIM_LIMITS)
    c.start_nodes()
    c.wait_leader(60)
    return c


def enroll(c: LocalCluster, n: int, budget: dict[str, float],
           workers: int = 4) -> list[tuple[str, bytes, int]]:
    """Enroll n sites, each with a new Ed25519 key (and `budget`, when given, as its
    privacy budget on the ledger); returns (site, private seed, index)."""
    sites = []
    for i in range(n):
        key = Ed25519PrivateKey.generate()
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        sites.append((f"v{i:05d}", seed, wire.public_key_hex(key)))
    leader = c.admin_of(c.wait_leader(30))
    local = threading.local()

    def one(item: tuple[str, bytes, str]) -> None:
        if not hasattr(local, "admin"):
            local.admin = AdminClient(OperatorConfig((leader,), c.operator), timeout=30)
        local.admin.call("Enroll", {"site": item[0], "public_key": item[2], **budget})

    with ThreadPoolExecutor(workers) as pool:
        for k, _ in enumerate(pool.map(one, sites), 1):
            if k % 1000 == 0:
                log(f"{k} sites enrolled")
    return [(s, seed, i) for i, (s, seed, _) in enumerate(sites)]


def host_tls(c: LocalCluster, k: int) -> tuple[bytes, bytes, bytes]:
    """Actor k's client certificate: its sites share it (each signs with its own key)."""
    name = f"sim-host-{k}"
    ident = pki.issue(c.ca_dir, c.root / "hosts" / name, "client", name)
    return (Path(ident.ca).read_bytes(), Path(ident.cert).read_bytes(),
            Path(ident.key).read_bytes())


# ---------------------------------------------------------------- the run


def trainers(args: argparse.Namespace) -> Any:
    """What the virtual sites train with: --task step (a random step, no data) or a
    built-in task on its share of the data, with DP-SGD when --epsilon is given."""
    from client.config import PrivacyConfig
    from client.virtual_sites import TaskTrainers, step_trainer

    if args.task == "step":
        return step_trainer
    privacy = PrivacyConfig(args.epsilon, planned_rounds=args.rounds) if args.epsilon else None
    return TaskTrainers(args.task, args.sites, privacy)


def start_hosts(ray: Any, c: LocalCluster, sites: list[tuple[str, bytes, int]],
                args: argparse.Namespace, actors: int, online: int
                ) -> tuple[list[Any], dict[str, Any]]:
    """The actors, their sites added and brought online; and the idle memory figures."""
    from client.virtual_sites import VirtualSites

    host = ray.remote(num_cpus=0)(VirtualSites).options(scheduling_strategy="SPREAD")
    fleet = [n.fleet for n in c.nodes]
    hosts = [host.remote(host_tls(c, k), fleet, trainers(args), seed=k) for k in range(actors)]
    empty = ray.get([h.stats.remote() for h in hosts])
    shares = [sites[k::actors] for k in range(actors)]
    ray.get([h.add_sites.remote(share) for h, share in zip(hosts, shares, strict=True)])
    ray.get([h.start.remote(online // actors + (k < online % actors))
             for k, h in enumerate(hosts)])
    time.sleep(args.settle)  # every online site has polled, and waits again
    idle = ray.get([h.stats.remote() for h in hosts])
    per_site = [(b["rss_mb"] - a["rss_mb"]) * 1024 / max(1, b["hosted"])
                for a, b in zip(empty, idle, strict=True)]
    status = c.admin.call("Status", endpoint=c.admin_of(c.wait_leader(30)))
    figures = {"actor_rss_empty_mb": [round(a["rss_mb"], 1) for a in empty],
               "actor_rss_idle_mb": [round(b["rss_mb"], 1) for b in idle],
               "idle_site_kb": round(max(per_site), 2),
               "online_on_leader": status.get("clients_online") or 0}
    return hosts, figures


def watch(c: LocalCluster, first: int, rounds: int, deadline: float,
          memory: MemoryWatch, quiet: bool) -> tuple[dict[str, Any], list[float]]:
    """Follow the run until `rounds` rounds after `first` are committed (or it stopped,
    or the deadline passed); returns the last round status and each commit's time."""
    from rich.progress import Progress

    ends: list[float] = []
    with Progress(transient=True, disable=quiet) as bar:
        job = bar.add_task("rounds", total=rounds)
        while True:
            st = c.newest_status()
            done = st["last_round"] - first
            while len(ends) < done:
                ends.append(time.monotonic())
                log(f"round {first + len(ends)} committed; memory {memory.last}")
            stage = (st.get("progress") or {}).get("stage", "-")
            mem = memory.last.get("rss_mb", 0.0)
            bar.update(job, completed=done,
                       description=f"rounds (stage {stage}, memory {mem:,.0f} MB)")
            if done >= rounds or st.get("stopped") or time.monotonic() > deadline:
                return c.round_status(), ends  # every round's history, paged
            time.sleep(1.0)


def round_rows(st: dict[str, Any], first: int, rounds: int, t0: float,
               ends: list[float]) -> list[dict[str, Any]]:
    rows, last = [], t0
    for i, r in enumerate(range(first + 1, first + rounds + 1)):
        h = st["history"].get(str(r)) or {}
        done = h.get("committed")
        if not done:
            break
        wall = ends[i] - last if i < len(ends) else None
        last = ends[i] if i < len(ends) else last
        rows.append({"round": r, "participants": len(done["participants"]),
                     "survivors": len(done["survivors"]),
                     "round_s": done["metrics"].get("seconds"),
                     "wall_s": round(wall, 1) if wall is not None else None,
                     "aborted_attempts": len(h.get("aborted") or []),
                     "base_accuracy": done["metrics"].get("base_accuracy")})
    return rows


def start_ray(ray: Any, address: str, tries: int = 3) -> None:
    """Join the Ray cluster at `address`, or start Ray on this machine. A local start is
    tried again: on a busy machine (another Ray starting beside it) its GCS server has been
    seen to miss Ray's start-up deadline."""
    for attempt in range(1, tries + 1):
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                         log_to_driver=False, object_store_memory=100 * 2**20)
            return
        except RuntimeError as exc:
            ray.shutdown()  # ends whatever of this start did come up
            if attempt == tries:
                raise
            log(f"Ray did not start ({exc}); trying again")
            time.sleep(5.0)


def simulate(args: argparse.Namespace, ray: Any, root: Path) -> dict[str, Any]:
    """One whole run; returns the figures `--json` prints."""
    memory = MemoryWatch()
    c = start_cluster(root, args.bind)
    hosts: list[Any] = []
    try:
        t = time.monotonic()
        budget = {"epsilon": args.epsilon, "delta": 1e-5} if args.epsilon else {}
        sites = enroll(c, args.sites, budget)
        enroll_s = time.monotonic() - t
        log(f"{args.sites} sites enrolled in {enroll_s:.1f} s")
        if args.task == "step":
            c.admin.call("InitModel", {"data": wire.encode_model(
                {"w": np.zeros(args.dim, np.float32)})})
        else:
            c.init_model(args.task)
        start_ray(ray, args.address)
        actors = args.actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
        online = min(args.sites, args.online or 2 * args.per_round)
        hosts, idle = start_hosts(ray, c, sites, args, actors, online)
        log(f"{actors} actors, {online} sites online: {idle}")
        before = c.admin.call("RoundStatus")
        first, changes0 = before["last_round"], len(before["leader_history"])
        t0 = time.monotonic()
        c.admin.call("Train", {"rounds": args.rounds, "config": {
            "clients": args.per_round,
            "min_clients": args.min_clients or max(2, args.per_round * 9 // 10),
            "compression": 10.0, "secure_aggregation": True, "online_wait_s": 120.0,
            "stage_timeout_s": args.stage_timeout, "collect_timeout_s": 2 * args.stage_timeout,
            "max_attempts": 3}})
        st, ends = watch(c, first, args.rounds, t0 + args.timeout, memory, args.json)
        stats = ray.get([h.stop.remote() for h in hosts])
        memory.sample()
        rows = round_rows(st, first, args.rounds, t0, ends)
        ledger = c.admin.all_sites()
        return {"sites": args.sites, "per_round": args.per_round, "rounds": args.rounds,
                "task": args.task, "epsilon": args.epsilon or None,
                "rounds_committed": len(rows), "actors": actors, "online": online,
                "ray_address": args.address or "local", "dim": args.dim,
                "enroll_s": round(enroll_s, 1), "round_rows": rows,
                "round_s": [r["round_s"] for r in rows], "wall_s": [r["wall_s"] for r in rows],
                "leader_changes": len(st["leader_history"]) - changes0,
                "stopped": st.get("stopped"),
                "peak_rss_mb": round(memory.peak_rss_mb, 1),
                "peak_pss_mb": round(memory.peak_pss_mb, 1),
                "actor_peak_rss_mb": [round(s["peak_rss_mb"], 1) for s in stats],
                "accepted": _merged([s["accepted"] for s in stats]),
                "activated": _merged([s["activated"] for s in stats]),
                # the replicated privacy ledger: sites charged, and the largest spend
                "sites_charged": sum(1 for x in ledger if x["charge_count"]),
                "max_epsilon_spent": round(max((float(x["spent"]) for x in ledger),
                                               default=0.0), 4),
                "host_counts": _merged([s["counts"] for s in stats]), **idle}
    finally:
        memory.stop()
        for h in hosts:
            ray.kill(h)
        ray.shutdown()
        c.stop()


def _merged(maps: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in maps:
        for k, v in m.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def summary(result: dict[str, Any]) -> None:
    """The per-round table and the memory figures, for people."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['sites']:,} virtual sites, {result['per_round']:,} per round, "
                        f"{result['actors']} Ray actors ({result['ray_address']})")
    for col in ("round", "participants", "survivors", "leader s", "wall s", "aborted"):
        table.add_column(col, justify="right")
    for r in result["round_rows"]:
        table.add_row(*(str(r[k]) for k in ("round", "participants", "survivors", "round_s",
                                            "wall_s", "aborted_attempts")))
    console = Console(stderr=False)
    console.print(table)
    console.print(f"peak memory (nodes + Ray + actors): RSS {result['peak_rss_mb']:,.0f} MB, "
                  f"PSS {result['peak_pss_mb']:,.0f} MB; idle virtual site: "
                  f"{result['idle_site_kb']:.1f} kB; leader changes: {result['leader_changes']}; "
                  f"enrollment {result['enroll_s']} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, default=10_000)
    ap.add_argument("--per-round", type=int, default=1_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-clients", type=int, default=0,
                    help="updates a round needs to commit (default: 90%% of --per-round)")
    ap.add_argument("--address", default="", help="a running Ray cluster (default: local Ray)")
    ap.add_argument("--bind", default="127.0.0.1", help="where the nodes listen")
    ap.add_argument("--actors", type=int, default=0, help="default: the Ray cluster's CPUs")
    ap.add_argument("--online", type=int, default=0, help="default: 2 x --per-round")
    ap.add_argument("--dim", type=int, default=10_000, help="the model's size with --task step")
    ap.add_argument("--task", default="step",
                    help="step (a random step, no data) or a built-in task (digits_small, ...)")
    ap.add_argument("--epsilon", type=float, default=0.0,
                    help="each site's budget: record-level DP-SGD (a built-in task only)")
    ap.add_argument("--stage-timeout", type=float, default=60.0,
                    help="each SecAgg+ key stage's deadline (local training: twice it); the "
                         "node's default, 20 s, is for sites with a machine each")
    ap.add_argument("--settle", type=float, default=20.0,
                    help="seconds the sites idle online before the idle memory is read")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds for the rounds")
    ap.add_argument("--logs", default="", help="a directory to keep the nodes' logs in")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    try:
        import ray
    except ImportError:
        print(NEEDS_RAY, file=sys.stderr)
        return 2
    if not 2 <= args.per_round <= args.sites:
        print("--per-round must be between 2 and --sites", file=sys.stderr)
        return 2
    if args.epsilon and args.task == "step":
        print("--epsilon needs a built-in --task (DP-SGD trains on records)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="fedraft-simulate-"))
    try:
        result = simulate(args, ray, root)
    finally:
        if args.logs:  # the nodes' logs, kept for a look at each stage's time
            Path(args.logs).mkdir(parents=True, exist_ok=True)
            for log_file in root.glob("n*/node.log"):
                shutil.copy(log_file, Path(args.logs) / f"{log_file.parent.name}.log")
        shutil.rmtree(root, ignore_errors=True)
    summary(result)
    if args.json:
        print(json.dumps(result))
    return 0 if result["rounds_committed"] == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
