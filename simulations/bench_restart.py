"""How long a node takes to restart after a long run, with log compaction on.

    .venv/bin/python simulations/bench_restart.py [--rounds 200,87600] [--sites 100]
        [--restarts 3] [--cache DIR] [--json]

For each round count N: the state a run of N rounds with --sites sites leaves (every
site sampled each round, every round committed, the default node configuration) is
built by applying the real commands to the pure state machine (`coordinator.core`):
enrolment, the genesis model, the run, then `round_open` and `round_commit` for each
round (a year at 10 rounds an hour is 87,600 rounds). Every node of a real 3-node
cluster (mTLS, real node processes) gets it as its compacted Raft directory: the
snapshot a node writes (`coordinator.cluster.snapshot`) and the two-entry journal a
compaction leaves. The cluster starts on it; then a follower is SIGKILLed and started
again --restarts times, and each `restart_s` is the time from starting its process until
it serves the newest round and has applied the leader's commit index.

Reported per N: `rounds`, `journal_bytes` and `snapshot_bytes` (the restarted node's
files), `state_bytes` (the encoded state), `restart_s` (median), `cluster_start_s` (all
three nodes from cold to a leader serving round N), `status_reply_bytes` (one
`RoundStatus` reply, bounded by `api.STATUS_BYTES`) and `build_s`. `--json` prints one
JSON object as the last line: {"rows": [...], "restart_ratio": year / shortest}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from pysyncobj.journal import FileJournal  # noqa: E402
from pysyncobj.node import TCPNode  # noqa: E402
from pysyncobj.syncobj import _COMMAND_TYPE  # noqa: E402

from coordinator import wire  # noqa: E402
from coordinator.cluster import snapshot  # noqa: E402
from coordinator.core import commands as cmds  # noqa: E402
from coordinator.core import state as sm  # noqa: E402
from coordinator.demo.cluster import LocalCluster  # noqa: E402
from coordinator.ops.admin_client import AdminClient, OperatorConfig  # noqa: E402

NO_OP = bytes([_COMMAND_TYPE.NO_OP])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _hash(i: int) -> str:
    return hashlib.sha256(f"version {i}".encode()).hexdigest()


def _ok(state: dict[str, Any], command: dict[str, Any]) -> None:
    result = sm.apply(state, command)
    if not result.get("ok"):
        raise RuntimeError(f"{command['op']} refused: {result}")


def build_state(rounds: int, sites: int) -> dict[str, Any]:
    """The state after `rounds` committed rounds of `sites` sites, each sampled every round."""
    state = sm.initial_state()
    names = [f"site-{i:05d}" for i in range(sites)]
    for name in names:
        _ok(state, cmds.enroll(name, wire.public_key_hex(Ed25519PrivateKey.generate())))
    _ok(state, cmds.claim(1, "n1"))
    _ok(state, cmds.genesis(_hash(0), 40_000, ["n1", "n2", "n3"], 3))
    _ok(state, {**cmds.train(rounds, {"clients": sites, "min_clients": 2}), "submitted_term": 1})
    every = max(1, rounds // 20)
    for rnd in range(1, rounds + 1):
        _ok(state, cmds.round_open(1, rnd, 1, _hash(rnd - 1), names, _hash(-rnd)[:32]))
        _ok(state, cmds.round_commit(
            1, rnd, 1, node="n1", version=_hash(rnd), parent=_hash(rnd - 1), size=40_000,
            survivors=names, metrics={"loss": 0.5, "accuracy": 0.9, "seconds": 1.6},
            holders=["n1", "n2", "n3"], cluster_size=3, charges={},
            site_metrics={n: {"loss": 0.5, "accuracy": 0.9} for n in names}))
        if rnd % every == 0:
            log(f"  built {rnd}/{rounds} rounds")
    return state


def plant(raft_dir: Path, machine: dict[str, Any], members: list[str]) -> None:
    """Write the compacted Raft directory a node leaves: its snapshot, and a journal that
    holds only the two entries the snapshot ends at."""
    raft_dir.mkdir(parents=True, exist_ok=True)
    index = machine["seq"] + 10
    prev, last = (NO_OP, index - 1, 1), (NO_OP, index, 1)
    snap = snapshot.Snapshot(machine, last, prev, {TCPNode(m) for m in members})
    (raft_dir / snapshot.SNAPSHOT_NAME).write_bytes(snapshot.encode(snap))
    journal = FileJournal(str(raft_dir / "raft.journal"))
    journal.add(*prev)
    journal.add(*last)
    journal.setCurrentTerm(1, None)
    journal.setRaftCommitIndex(index)
    journal.onOneSecondTimer()
    journal.flush()
    journal._destroy()


def _status(admin: AdminClient, endpoint: str) -> dict[str, Any] | None:
    try:
        return admin.call("Status", endpoint=endpoint, timeout=2.0)
    except Exception as exc:  # down, or still starting: a fresh channel next time
        log(f"    {endpoint}: {exc}")
        admin.close()
        return None


def wait_serving(cluster: LocalCluster, node_id: str, rounds: int, timeout: float,
                 admin: AdminClient) -> float:
    """Seconds until `node_id` serves round `rounds` and has applied the leader's commit."""
    t0 = time.monotonic()
    endpoint = cluster.admin_of(node_id)
    while time.monotonic() - t0 < timeout:
        s = _status(admin, endpoint)
        leader = cluster.leader()
        ls = _status(admin, cluster.admin_of(leader)) if leader else None
        if (s is not None and ls is not None and s["state"]["last_round"] == rounds
                and s["raft"]["last_applied"] >= ls["raft"]["commit_index"]):
            return time.monotonic() - t0
        time.sleep(0.05)
    raise TimeoutError(f"{node_id} did not serve round {rounds} within {timeout:.0f}s")


def files_of(raft_dir: Path) -> tuple[int, int]:
    journal = sum(p.stat().st_size for p in raft_dir.glob("raft.journal*"))
    return journal, (raft_dir / snapshot.SNAPSHOT_NAME).stat().st_size


def measure(rounds: int, sites: int, restarts: int, cache: Path | None) -> dict[str, Any]:
    t0 = time.monotonic()
    cached = cache / f"state-{rounds}-{sites}.snapshot" if cache else None
    if cached is not None and cached.exists():
        machine = snapshot.decode(cached.read_bytes()).machine
    else:
        machine = build_state(rounds, sites)
        if cached is not None:
            cache.mkdir(parents=True, exist_ok=True)
            cached.write_bytes(snapshot.encode(snapshot.Snapshot(machine, (NO_OP, 2, 1),
                                                                 (NO_OP, 1, 1), set())))
    build_s = time.monotonic() - t0
    state_bytes = len(snapshot.encode(snapshot.Snapshot(machine, (NO_OP, 2, 1), (NO_OP, 1, 1), set())))
    root: Path | None = Path(tempfile.mkdtemp(prefix="fedraft-restart-"))
    cluster = LocalCluster(root)
    admin = AdminClient(OperatorConfig(tuple(n.admin for n in cluster.nodes), cluster.operator),
                        timeout=10)
    try:
        members = [n.raft for n in cluster.nodes]
        for node in cluster.nodes:
            plant(root / node.id / "data" / "raft", machine, members)
        t = time.monotonic()
        cluster.start_nodes()
        cluster.wait_leader(120)
        for node in cluster.nodes:
            wait_serving(cluster, node.id, rounds, 120, admin)
        cluster_start_s = time.monotonic() - t
        times = []
        for i in range(restarts):
            leader = cluster.wait_leader(60)
            victim = next(n.id for n in cluster.nodes if n.id != leader)
            cluster.kill_node(victim, signal.SIGKILL)
            time.sleep(0.5)
            cluster.start_node(victim)
            times.append(wait_serving(cluster, victim, rounds, 120, admin))
            log(f"  restart {i + 1}: {victim} serving after {times[-1]:.2f}s")
        leader = cluster.wait_leader(60)
        reply = admin.call("RoundStatus", endpoint=cluster.admin_of(leader))
        journal_bytes, snapshot_bytes = files_of(root / victim / "data" / "raft")
        return {"rounds": rounds, "sites": sites, "journal_bytes": journal_bytes,
                "snapshot_bytes": snapshot_bytes, "state_bytes": state_bytes,
                "restart_s": round(statistics.median(times), 2),
                "restart_s_all": [round(x, 2) for x in times],
                "cluster_start_s": round(cluster_start_s, 2),
                "status_reply_bytes": len(wire.pack(reply)),
                "status_rounds": [reply["rounds_from"], reply["rounds_to"]],
                "build_s": round(build_s, 1)}
    except BaseException:
        log(f"  failed: the cluster's logs are kept in {root}")
        root = None
        raise
    finally:
        admin.close()
        cluster.stop()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", default="200,87600", help="comma-separated round counts")
    ap.add_argument("--sites", type=int, default=100)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--cache", type=Path, help="keep built states here and reuse them")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for rounds in (int(x) for x in args.rounds.split(",")):
        log(f"{rounds} rounds, {args.sites} sites: building the state")
        rows.append(measure(rounds, args.sites, args.restarts, args.cache))
        log(f"  {rows[-1]}")
    print(f"{'rounds':>8} {'journal':>10} {'snapshot':>11} {'state':>11} {'restart s':>10} "
          f"{'cluster start s':>16} {'status reply':>13}")
    for r in rows:
        print(f"{r['rounds']:>8} {r['journal_bytes']:>10,} {r['snapshot_bytes']:>11,} "
              f"{r['state_bytes']:>11,} {r['restart_s']:>10.2f} {r['cluster_start_s']:>16.2f} "
              f"{r['status_reply_bytes']:>13,}")
    ratio = rows[-1]["restart_s"] / min(r["restart_s"] for r in rows) if rows else None
    if ratio is not None:
        print(f"restart, longest run / shortest: {ratio:.2f}x")
    if args.json:
        print(json.dumps({"rows": rows, "restart_ratio": round(ratio, 2) if ratio else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
