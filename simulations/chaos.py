"""Randomized fault injection against a real 3-node cluster with real site agents.

    .venv/bin/python simulations/chaos.py [--trials N | --long] [--seed S] [--json]

One cluster (mTLS on 127.0.0.1) trains breast_cancer with --sites site agents and a
rounds target that keeps training running, while a writer thread streams admin writes
(`Enroll` of a unique site id each) and records every write acknowledged with ok=True.
Each trial picks one fault at random:

* kill_leader:   SIGKILL the leader, restart it after a random downtime
* kill_follower: SIGKILL one follower, restart it after a random downtime
* kill_all:      SIGKILL every node, restart them all after a random downtime
* stop_leader:   SIGSTOP the leader for a random 0.5-3 s, then SIGCONT

Log compaction under faults: `--snapshot-entries N` makes the nodes snapshot and trim
their journals every N entries, and `--crash-points P` makes each node exit as SIGKILL
would, with probability P, at every step of a compaction (snapshot written, snapshot in
place, journal trimmed); such a node is restarted at once (`crash_restarts`), and
`--faults kill_all` restricts the faults to killing every node at random points.

After each trial (every node running, a leader that has claimed its term) every node is
checked once it has applied the leader's commit index:

* acknowledged_lost: acknowledged enrollments missing from that node's `Sites`
* repeated_versions: a version hash twice, two versions for one round (on one node,
  across nodes, or across time), or a chain whose parents do not link
* overspend: sites whose privacy spend exceeds their budget, computed from the
  `Sites`/`RoundStatus` replies when they carry a budget; where they carry none the
  check is reported as not done (overspend_checked: false), never as passed
* rounds_committed: rounds committed during the run

`--json` prints one JSON object as the last line of stdout. Progress goes to stderr.
Exit status 0 when every invariant held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from node_orphans import sigkill_node, stop_cluster  # noqa: E402

from coordinator import wire  # noqa: E402
from coordinator.cluster.snapshot import CRASH_EXIT, CRASH_POINTS_ENV  # noqa: E402
from coordinator.demo.cluster import LocalCluster  # noqa: E402
from coordinator.ops.admin_client import AdminClient, OperatorConfig, Refused, Unreachable  # noqa: E402

TASK = "breast_cancer"
FAULTS = ("kill_leader", "kill_follower", "kill_all", "stop_leader")
EPS_TOLERANCE = 1e-9


class ChaosStuck(Exception):
    """The cluster did not recover (no leader, or a node never caught up)."""


# ---------------------------------------------------------------------- the writer


class Writer(threading.Thread):
    """Streams `Enroll` writes of unique sites; keeps the ones acknowledged ok=True."""

    def __init__(self, cluster: LocalCluster, prefix: str, rate: float, timeout: float) -> None:
        super().__init__(name="chaos-writer", daemon=True)
        self.config = OperatorConfig(tuple(n.admin for n in cluster.nodes), cluster.operator)
        self.timeout = timeout
        self.admin = AdminClient(self.config, timeout=timeout)
        self.prefix = prefix
        self.period = 1.0 / rate if rate > 0 else 0.0
        self.acked: list[str] = []
        self.failed = 0  # no answer: outcome unknown, not counted as acknowledged
        self.refused: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self._n = 0

    def snapshot(self) -> list[str]:
        with self.lock:
            return list(self.acked)

    def run(self) -> None:
        try:
            self._loop()
        finally:
            self.admin.close()  # only this thread touches the client

    def _loop(self) -> None:
        while not self.stopped.is_set():
            t = time.monotonic()
            self._n += 1
            site = f"{self.prefix}-{self._n:06d}"
            key = Ed25519PrivateKey.generate()
            msg = {"site": site, "public_key": wire.public_key_hex(key), "request_id": uuid.uuid4().hex}
            try:
                reply = self.admin.call("Enroll", msg)
            except Unreachable:
                self.failed += 1
                # fresh channels: a cached one stays in gRPC reconnect backoff after its
                # node is back (see Views)
                self.admin.close()
                self.admin = AdminClient(self.config, timeout=self.timeout)
                self.stopped.wait(0.05)
                continue
            except Refused as exc:
                self.refused[exc.code] += 1
                continue
            if reply.get("ok"):
                with self.lock:
                    self.acked.append(site)
            else:
                self.refused[str(reply.get("code"))] += 1
            if self.period:
                self.stopped.wait(max(0.0, self.period - (time.monotonic() - t)))

    def stop(self) -> None:
        self.stopped.set()
        self.join(30)


# ---------------------------------------------------------------------- cluster views


class Views:
    """Short-deadline reads of each node, so a stopped node cannot stall the checker.

    A gRPC channel whose peer was down stays in reconnect backoff (1 s growing to 120 s)
    after the peer is back, failing calls at once; so the checker drops a node's channel
    whenever a call fails and dials afresh, to see a restarted node as soon as it is up.
    """

    def __init__(self, cluster: LocalCluster, timeout: float = 2.0) -> None:
        self.cluster = cluster
        self.timeout = timeout
        self._clients: dict[str, AdminClient] = {}

    def _client(self, node_id: str) -> AdminClient:
        if node_id not in self._clients:
            self._clients[node_id] = AdminClient(
                OperatorConfig((self.cluster.admin_of(node_id),), self.cluster.operator), timeout=self.timeout
            )
        return self._clients[node_id]

    def call(self, node_id: str, method: str) -> dict[str, Any] | None:
        try:
            client = self._client(node_id)
            return client.round_status() if method == "RoundStatus" else client.call(method)
        except (Unreachable, Refused):
            self._clients.pop(node_id).close()
            return None

    def sites(self, node_id: str) -> dict[str, Any] | None:
        """Every site `node_id` holds (all `Sites` pages), as {"sites": [...]}."""
        try:
            return {"sites": self._client(node_id).all_sites()}
        except (Unreachable, Refused):
            self._clients.pop(node_id).close()
            return None

    def leader(self) -> tuple[str, int] | None:
        """(leader, its commit index) for a leader that has claimed its term, when its
        term is the newest any node reports: a leader frozen by SIGSTOP still calls
        itself leader for a while after SIGCONT, and must not be taken for the real one."""
        views = {}
        for n in self.cluster.nodes:
            if self.cluster.node_procs[n.id].alive:
                s = self.call(n.id, "Status")
                if s is not None:
                    views[n.id] = s
        if not views:
            return None
        newest = max(s["raft"]["term"] for s in views.values())
        for node_id, s in views.items():
            if (
                s["raft"]["state"] == "leader"
                and s["raft"]["term"] == newest
                and s["state"]["fence_term"] == newest
            ):
                return node_id, s["raft"]["commit_index"]
        return None

    def wait_leader(self, timeout: float) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.leader()
            if found is not None:
                return found
            time.sleep(0.05)
        raise ChaosStuck(f"no leader with a claimed term within {timeout:.0f}s")

    def wait_caught_up(self, target: int, timeout: float) -> None:
        """Wait until every node has applied log index `target`."""
        deadline = time.monotonic() + timeout
        pending = {n.id for n in self.cluster.nodes}
        while pending:
            for node_id in sorted(pending):
                v = self.call(node_id, "Status")
                if v is not None and v["raft"]["last_applied"] >= target:
                    pending.discard(node_id)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise ChaosStuck(f"nodes {sorted(pending)} did not reach commit index {target}")
            time.sleep(0.05)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


# ---------------------------------------------------------------------- invariants


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _epsilon(value: Any) -> float | None:
    """A budget or spend as epsilon: a number, or a map with an `epsilon` entry."""
    if isinstance(value, dict):
        return _number(value.get("epsilon"))
    return _number(value)


def overspend_from(sites_reply: dict[str, Any], round_status: dict[str, Any]) -> tuple[bool, set[str]]:
    """(checked, sites whose epsilon spend exceeds the budget).

    Budgets are read from `Sites` (`budget` or `epsilon_budget` per site). The spend is
    the site's own `spent`/`epsilon_spent` field where the reply has one (the ledger's
    word, whatever composition it uses), else the sum of the `charges` recorded against
    the site in `RoundStatus` history (committed and aborted attempts alike: a charge
    is spent whether or not its round committed). Without a budget nothing can be
    checked, and that is what is reported.
    """
    budgets: dict[str, float] = {}
    spent: dict[str, float] = defaultdict(float)
    have_spend = False
    for rec in sites_reply.get("sites", []):
        site = rec.get("site")
        b = _epsilon(rec.get("budget", rec.get("epsilon_budget")))
        if b is not None:
            budgets[site] = b
        sp = _epsilon(rec.get("spent", rec.get("epsilon_spent")))
        if sp is not None:
            have_spend = True
            spent[site] = max(spent[site], sp)
    charged: dict[str, float] = defaultdict(float)
    for h in round_status.get("history", {}).values():
        attempts = [h.get("committed")] + list(h.get("aborted") or [])
        for a in attempts:
            charges = a.get("charges") if isinstance(a, dict) else None
            if not isinstance(charges, dict):
                continue
            for site, c in charges.items():
                eps = _epsilon(c)
                if eps is not None:
                    have_spend = True
                    charged[site] += eps
    if not budgets or not have_spend:
        return False, set()
    over = {
        s for s, b in budgets.items() if (spent[s] if s in spent else charged.get(s, 0.0)) > b + EPS_TOLERANCE
    }
    return True, over


class Ledger:
    """Everything observed so far, to catch violations within a node, across nodes and in time."""

    def __init__(self) -> None:
        self.by_round: dict[int, str] = {}  # first hash seen committed for each round
        self.violations: set[tuple[Any, ...]] = set()
        self.lost: set[str] = set()
        self.versions_lost: set[int] = set()
        self.overspent: set[str] = set()
        self.overspend_checked = False
        self.confirmed_round = -1
        self.dp_view: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.audit_damaged: set[str] = set()  # "node: why", as Status reported it

    def note(self, key: tuple[Any, ...], text: str) -> None:
        if key not in self.violations:
            self.violations.add(key)
            self.notes.append(text)

    def check_chain(self, node: str, rs: dict[str, Any]) -> int:
        versions = rs["versions"]
        seen_hash: dict[str, int] = {}
        for i, v in enumerate(versions):
            if v["round"] != i:
                self.note(("index", node, i, v["round"]), f"{node}: version #{i} is for round {v['round']}")
            if v["hash"] in seen_hash:
                self.note(
                    ("dup_hash", v["hash"]),
                    f"{node}: hash {v['hash'][:12]} is the version of rounds "
                    f"{seen_hash[v['hash']]} and {v['round']}",
                )
            seen_hash.setdefault(v["hash"], v["round"])
            want_parent = None if i == 0 else versions[i - 1]["hash"]
            if v["parent"] != want_parent:
                self.note(
                    ("parent", v["round"], v["hash"]),
                    f"{node}: round {v['round']} names parent "
                    f"{str(v['parent'])[:12]}, not {str(want_parent)[:12]}",
                )
            first = self.by_round.setdefault(v["round"], v["hash"])
            if first != v["hash"]:
                self.note(
                    ("two_versions", v["round"], v["hash"]),
                    f"{node}: round {v['round']} has version {v['hash'][:12]}, earlier {first[:12]}",
                )
            if i > 0:
                committed = (rs.get("history", {}).get(str(v["round"])) or {}).get("committed")
                if not committed or committed.get("version") != v["hash"]:
                    self.note(
                        ("history", v["round"], v["hash"]),
                        f"{node}: history of round {v['round']} does not name {v['hash'][:12]}",
                    )
        last = len(versions) - 1
        if last < self.confirmed_round:
            for r in range(last + 1, self.confirmed_round + 1):
                if r not in self.versions_lost:
                    self.versions_lost.add(r)
                    self.notes.append(f"{node}: committed round {r} is gone (node's chain ends at {last})")
        return last

    def confirm(self, lasts: list[int]) -> None:
        """Rounds every node held at one check: from then on no node may lack them."""
        self.confirmed_round = max(self.confirmed_round, min(lasts))

    def check_sites(self, node: str, sites_reply: dict[str, Any], acked: list[str]) -> None:
        present = {rec["site"] for rec in sites_reply.get("sites", [])}
        missing = [s for s in acked if s not in present]
        for s in missing:
            if s not in self.lost:
                self.lost.add(s)
                self.notes.append(f"{node}: acknowledged enrollment {s} is missing")

    def check_overspend(self, sites_reply: dict[str, Any], rs: dict[str, Any]) -> None:
        self.dp_view = {
            rec["site"]: {
                "budget": _epsilon(rec.get("budget")),
                "spent": rec.get("spent"),
                "charges": rec.get("charge_count", 0),
                "can_pay": rec.get("can_pay"),
                "last": _epsilon(rec.get("last_charge") or {}) or 0.0,
            }
            for rec in sites_reply.get("sites", [])
            if str(rec.get("site")).startswith("dp-")
        }
        checked, over = overspend_from(sites_reply, rs)
        self.overspend_checked = self.overspend_checked or checked
        for s in sorted(over - self.overspent):
            self.notes.append(f"site {s} spent more than its privacy budget")
        self.overspent |= over

    def dp_can_pay(self) -> bool:
        """Whether some DP site can still be charged (the coordinator's own test: its last
        charge again, added linearly, fits the budget; a site never charged can pay)."""
        for v in self.dp_view.values():
            if v["can_pay"] is not None:
                if v["can_pay"]:
                    return True
                continue
            if v["budget"] is not None and (v["spent"] or 0.0) + v["last"] <= v["budget"] + 1e-9:
                return True
        return False

    @property
    def repeated_versions(self) -> int:
        return len(self.violations)


def wait_progress(cluster: LocalCluster, views: Views, after: int, timeout: float) -> int:
    """Wait (bounded) until some node reports a round beyond `after`; returns the newest."""
    deadline = time.monotonic() + timeout
    newest = after
    while time.monotonic() < deadline:
        for n in cluster.nodes:
            s = views.call(n.id, "Status")
            if s is not None:
                newest = max(newest, s["state"]["last_round"])
        if newest > after:
            break
        time.sleep(0.1)
    return newest


def check_cluster(
    cluster: LocalCluster, views: Views, writer: Writer, ledger: Ledger, timeout: float
) -> dict[str, Any]:
    """Wait for a leader and for every node to catch up, then check every node."""
    # The snapshot comes first: every write in it was committed before the newest
    # leader's claim or by that leader, so that leader's commit index covers it.
    acked = writer.snapshot()
    leader, target = views.wait_leader(timeout)
    views.wait_caught_up(target, timeout)
    lasts = []
    for n in cluster.nodes:
        status, sites, rs = read_caught_up(views, n.id, target, timeout)
        ledger.check_sites(n.id, sites, acked)
        if status.get("audit_damaged"):
            ledger.audit_damaged.add(f"{n.id}: {status['audit_damaged']}")
        lasts.append(ledger.check_chain(n.id, rs))
        ledger.check_overspend(sites, rs)
    ledger.confirm(lasts)
    return {"leader": leader, "last_round": max(lasts), "acked": len(acked)}


def read_caught_up(views: Views, node_id: str, target: int,
                   timeout: float) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A node's Status, Sites and RoundStatus, read once it has applied `target`. A node
    that died meanwhile (a compaction crash point) is read again once it is back."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = views.call(node_id, "Status")
        if status is not None and status["raft"]["last_applied"] >= target:
            sites = views.sites(node_id)
            rs = views.call(node_id, "RoundStatus")
            if sites is not None and rs is not None:
                return status, sites, rs
        time.sleep(0.2)
    raise ChaosStuck(f"{node_id} stopped answering during the check")


# ---------------------------------------------------------------------- faults


_starting = threading.Lock()


def restart(cluster: LocalCluster, node_id: str) -> bool:
    """Start a node unless it runs (a crash-point exit may already have been revived)."""
    with _starting:
        if cluster.node_procs[node_id].alive:
            return False
        cluster.start_node(node_id)
        return True


class Reviver(threading.Thread):
    """Restarts, at once, every node that left at a compaction crash point (its exit
    status says so), as a supervisor would."""

    def __init__(self, cluster: LocalCluster) -> None:
        super().__init__(name="chaos-reviver", daemon=True)
        self.cluster = cluster
        self.restarts: Counter[str] = Counter()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.1):
            for node_id, proc in self.cluster.node_procs.items():
                if proc.popen is not None and proc.popen.poll() == CRASH_EXIT:
                    if restart(self.cluster, node_id):
                        self.restarts[node_id] += 1

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)


def inject(
    cluster: LocalCluster, views: Views, fault: str, rng: random.Random, short: bool, orphans: list[int]
) -> str:
    """Apply one fault and undo it (restart / SIGCONT); returns a description."""
    leader, _ = views.wait_leader(60)
    down = rng.uniform(0.3, 1.5) if short else rng.uniform(0.5, 3.0)
    if fault == "kill_leader":
        sigkill_node(cluster, leader, orphans)
        time.sleep(down)
        restart(cluster, leader)
        return f"SIGKILL leader {leader}, down {down:.1f}s"
    if fault == "kill_follower":
        victim = rng.choice([n.id for n in cluster.nodes if n.id != leader])
        sigkill_node(cluster, victim, orphans)
        time.sleep(down)
        restart(cluster, victim)
        return f"SIGKILL follower {victim}, down {down:.1f}s"
    if fault == "kill_all":
        order = [n.id for n in cluster.nodes]
        rng.shuffle(order)
        for node_id in order:
            sigkill_node(cluster, node_id, orphans)
        time.sleep(down)
        for node_id in order:
            restart(cluster, node_id)
        return f"SIGKILL all nodes, down {down:.1f}s"
    if fault == "stop_leader":
        pause = rng.uniform(0.5, 3.0)
        cluster.kill_node(leader, signal.SIGSTOP)
        try:
            time.sleep(pause)
        finally:
            cluster.kill_node(leader, signal.SIGCONT)
        return f"SIGSTOP leader {leader} for {pause:.1f}s"
    raise ValueError(fault)


# ---------------------------------------------------------------------- reporting


class Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()

    def update(self, done: int, text: str) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / max(1, self.total))
        bar = "#" * filled + "." * (width - filled)
        elapsed = time.monotonic() - self.t0
        eta = elapsed / done * (self.total - done) if done else 0.0
        line = f"[{bar}] {done}/{self.total} {elapsed:5.0f}s eta {eta:4.0f}s  {text}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line[:160])
            if done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def log(self, text: str) -> None:
        if self.enabled:
            prefix = "\r\033[K" if self.tty else ""
            sys.stderr.write(f"{prefix}{text}\n")
            sys.stderr.flush()


def setup(cluster: LocalCluster, sites: int, dp_sites: int, dp: dict[str, float], progress: Progress) -> None:
    """Sites `dp-*` train with DP-SGD under a small budget that runs out during the run, so
    the ledger is charged, retried and capped under faults; sites `site-*` train without
    DP and keep the rounds going once the DP sites are exhausted."""
    cluster.start_nodes()
    cluster.wait_leader(60)
    names = [f"dp-{i}" for i in range(dp_sites)] + [f"site-{i}" for i in range(sites - dp_sites)]
    for s in names:
        if s.startswith("dp-"):
            cluster.add_site(s, budget=(dp["epsilon"], dp["delta"]))
        else:
            cluster.add_site(s)
    cluster.init_model(TASK)
    for i, s in enumerate(names):
        privacy = dp if s.startswith("dp-") else None
        cluster.start_site(s, cluster.write_site_config(s, TASK, i, sites, "iid", privacy=privacy))
    # online_wait_s is short: once the DP sites are exhausted fewer than `clients` sites
    # are eligible and online, and each round waits that long before going on without them
    config = {
        "clients": sites,
        "fraction": 1.0,
        "min_clients": 2,
        "local_epochs": 1,
        "batch_size": 32,
        "collect_timeout_s": 10.0,
        "online_wait_s": 1.0,
    }
    cluster.admin.call("Train", {"rounds": 100_000, "config": config})
    progress.log(f"cluster up in {cluster.root}; waiting for the first round")
    cluster.wait_round(1, timeout=180)


def snapshots_taken(cluster: LocalCluster) -> int:
    """Compactions the nodes logged (their logs survive restarts)."""
    total = 0
    for node in cluster.nodes:
        log_file = cluster.root / node.id / "node.log"
        if log_file.exists():
            total += log_file.read_text(errors="replace").count("snapshot at ")
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, help="fault trials (default 50; 300 with --long)")
    ap.add_argument(
        "--long",
        action="store_true",
        help="300 trials with the full 0.5-3 s downtimes (short mode: 0.3-1.5 s)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    ap.add_argument("--sites", type=int, default=4, help="site agents (default 4)")
    ap.add_argument(
        "--dp-sites",
        type=int,
        default=2,
        help="how many of the sites train with DP-SGD under a budget (default 2)",
    )
    ap.add_argument("--dp-epsilon", type=float, default=1.0, help="their epsilon budget")
    ap.add_argument(
        "--dp-rounds",
        type=int,
        default=3,
        help="rounds their noise is planned for, about when they run out (default 3: "
        "DP rounds are slow after each leader change, so they run out early "
        "and the other sites keep the rounds going)",
    )
    ap.add_argument(
        "--dp-gate-trials",
        type=int,
        default=15,
        help="while a DP site can still pay, at most this many trials first wait for a round",
    )
    ap.add_argument("--dp-gate-timeout", type=float, default=20.0)
    ap.add_argument("--election", type=float, nargs=2, default=(0.6, 1.2), metavar=("MIN", "MAX"))
    ap.add_argument("--write-rate", type=float, default=10.0, help="admin writes per second")
    ap.add_argument("--write-timeout", type=float, default=2.0, help="deadline per admin call")
    ap.add_argument(
        "--recover-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for a leader and for catch-up after a fault",
    )
    ap.add_argument("--snapshot-entries", type=int, default=None,
                    help="nodes compact their journal every N entries (default: the node default)")
    ap.add_argument("--crash-points", type=float, default=0.0, metavar="P",
                    help="each node exits with probability P at every compaction step")
    ap.add_argument("--faults", default=",".join(FAULTS),
                    help=f"comma-separated faults to draw from (default {','.join(FAULTS)})")
    ap.add_argument("--root", type=Path, help="cluster directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the cluster directory")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = ap.parse_args()
    trials = args.trials if args.trials is not None else (300 if args.long else 50)
    if not 0 <= args.dp_sites <= args.sites - 2:
        ap.error("--dp-sites must leave at least 2 sites without DP to keep training going")
    dp = {"epsilon": args.dp_epsilon, "delta": 1e-5, "planned_rounds": args.dp_rounds, "clip_norm": 1.0}
    rng = random.Random(args.seed)
    progress = Progress(trials, not args.quiet)

    root = args.root or Path(tempfile.mkdtemp(prefix="fedraft-chaos-"))
    started = time.monotonic()
    fault_kinds = [f for f in args.faults.split(",") if f]
    if not fault_kinds or set(fault_kinds) - set(FAULTS):
        ap.error(f"--faults: choose from {','.join(FAULTS)}")
    cluster = LocalCluster(root, num_nodes=3, election=tuple(args.election),  # type: ignore[arg-type]
                           snapshot_entries=args.snapshot_entries)
    if args.crash_points:
        cluster.env[CRASH_POINTS_ENV] = str(args.crash_points)
    reviver = Reviver(cluster)
    views = Views(cluster)
    ledger = Ledger()
    faults: Counter[str] = Counter()
    orphans: list[int] = []
    writer: Writer | None = None
    stuck: str | None = None
    done = gated = 0
    first_round = last_round = 0
    try:
        setup(cluster, args.sites, args.dp_sites, dp, progress)
        reviver.start()
        writer = Writer(
            cluster, f"chaos-{args.seed}-{uuid.uuid4().hex[:6]}", args.write_rate, args.write_timeout
        )
        writer.start()
        first = check_cluster(cluster, views, writer, ledger, args.recover_timeout)
        first_round = last_round = first["last_round"]
        progress.t0 = time.monotonic()
        for i in range(trials):
            if args.dp_sites and gated < args.dp_gate_trials and ledger.dp_can_pay():
                # DP rounds are slow (DP-SGD, and a new leader's charge worker starts cold):
                # while a DP site can still pay, let a round commit before the next fault,
                # so that charges, aborts and retries happen under the faults at all.
                gated += 1
                wait_progress(cluster, views, last_round, args.dp_gate_timeout)
            fault = rng.choice(fault_kinds)
            time.sleep(rng.uniform(0.0, 0.6))  # land faults in different stages of a round
            what = inject(cluster, views, fault, rng, short=not args.long, orphans=orphans)
            faults[fault] += 1
            view = check_cluster(cluster, views, writer, ledger, args.recover_timeout)
            last_round = view["last_round"]
            done = i + 1
            progress.update(
                done,
                f"{what:<38} rounds +{last_round - first_round} "
                f"acked {view['acked']} lost {len(ledger.lost)} "
                f"bad {ledger.repeated_versions}",
            )
    except ChaosStuck as exc:
        stuck = str(exc)
        progress.log(f"cluster did not recover: {exc}")
        # every node and agent prints all its threads' stacks into its log (faulthandler)
        for p in [*cluster.node_procs.values(), *cluster.site_procs.values()]:
            p.signal(signal.SIGCONT)
            p.signal(signal.SIGUSR1)
        time.sleep(2.0)
    finally:
        if reviver.is_alive():
            reviver.stop()
        if writer is not None:
            writer.stop()
        for p in cluster.node_procs.values():
            p.signal(signal.SIGCONT)
        views.close()
        stop_cluster(cluster, orphans)
        if stuck is None and not args.keep and args.root is None:
            shutil.rmtree(root, ignore_errors=True)
        elif stuck is not None:
            progress.log(f"logs and stack dumps kept in {root}")
    wall = time.monotonic() - started

    result = {
        "trials": done,
        "acknowledged_lost": len(ledger.lost),
        "repeated_versions": ledger.repeated_versions,
        "overspend": len(ledger.overspent),
        "overspend_checked": ledger.overspend_checked,
        "rounds_committed": last_round - first_round,
        "trials_requested": trials,
        "versions_lost": len(ledger.versions_lost),
        "version_violation_kinds": dict(Counter(k[0] for k in ledger.violations)),
        "writes_acknowledged": len(writer.acked) if writer else 0,
        "writes_unanswered": writer.failed if writer else 0,
        "writes_refused": dict(writer.refused) if writer else {},
        "faults": dict(faults),
        "crash_restarts": sum(reviver.restarts.values()),
        "audit_damaged": sorted(ledger.audit_damaged),
        "snapshots": snapshots_taken(cluster),
        "dp_gated_trials": gated,
        "orphans_ended": len(orphans),
        "dp_sites": ledger.dp_view,
        "stuck": stuck,
        "root": str(root) if stuck is not None or args.keep or args.root is not None else None,
        "seed": args.seed,
        "election_s": list(args.election),
        "wall_s": round(wall, 1),
        "violations": ledger.notes[:50],
    }
    print(f"fedraft chaos: {done}/{trials} trials, seed {args.seed}, {wall:.0f}s wall")
    print(f"  faults                 {', '.join(f'{k} {v}' for k, v in sorted(faults.items()))}")
    refused = sum(writer.refused.values()) if writer else 0
    print(
        f"  writes acknowledged    {result['writes_acknowledged']} "
        f"(unanswered {result['writes_unanswered']}, refused {refused})"
    )
    print(f"  acknowledged lost      {result['acknowledged_lost']}")
    if args.snapshot_entries or args.crash_points:
        print(f"  snapshots taken        {result['snapshots']} "
              f"(crash-point exits restarted: {result['crash_restarts']})")
    print(f"  repeated versions      {result['repeated_versions']}")
    print(f"  audit logs damaged     {len(ledger.audit_damaged)}")
    for why in sorted(ledger.audit_damaged)[:5]:
        print(f"    {why[:300]}")
    print(f"  committed rounds lost  {result['versions_lost']}")
    spend = "" if ledger.overspend_checked else " (NOT CHECKED: no budget in the replies)"
    print(f"  overspend              {result['overspend']}{spend}")
    for site, v in sorted(ledger.dp_view.items()):
        print(
            f"    {site}: spent {v['spent']:.4f} of {v['budget']:g} over {v['charges']} charges"
            f"{' (cannot pay another round)' if v['can_pay'] is False else ''}"
        )
    print(f"  rounds committed       {result['rounds_committed']}")
    if orphans:
        print(f"  orphans ended          {len(orphans)} (node children that outlived their node)")
    if stuck:
        print(f"  STUCK: {stuck}")
    for note in ledger.notes[:20]:
        print(f"  violation: {note}")
    if args.json:
        print(json.dumps(result))
    ok = (
        not stuck
        and done == trials
        and not ledger.lost
        and not ledger.violations
        and not ledger.versions_lost
        and not ledger.overspent
        and not ledger.audit_damaged
        and result["rounds_committed"] > 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
