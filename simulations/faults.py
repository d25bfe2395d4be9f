"""Storage and port faults against a live cluster: detected, never served, recovered?

    .venv/bin/python simulations/faults.py [--trials 3] [--faults a,b,...] [--json]

For each fault kind, a real 3-node cluster (mTLS on 127.0.0.1) trains breast_cancer with
3 real site agents while a writer streams acknowledged `Enroll`s (simulations/chaos.py's
Writer). Each trial damages one node the way a bad disk, a careless hand or a stranger
on the Raft port does, then measures:

* cluster_available: a majority acknowledged a write within 5 s of the fault;
* stale_or_diverged_served: a node answered with state behind or apart from the leader's
  while it held damage (a damaged journal node must not answer at all);
* acknowledged_lost: acknowledged enrollments missing from any node afterwards;
* detected: the damaged node named the damage (exit 5 and its line; a quarantine line
  for a blob; a refused-connection line for the port; `audit verify --head` failing);
* recovered_s: from the fault to the damaged node holding the leader's state again (the
  journal kinds run `fedraft node recover` and restart it; blobs heal by themselves; a
  node whose audit tail was cut is restarted and rebuilds its log from its Raft journal).

Journal kinds hit a follower (stopped, damaged, restarted); blob kinds the leader or a
follower; port kinds the leader; the disk-full kind fills n1's own small disk (a tmpfs in
a mount namespace of its own, so it needs root), leader or not. `--json` prints one JSON
object as the last line; progress goes to stderr.
Exit status 0 when every total is 0 and every damaged node recovered.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos import Writer  # noqa: E402

from coordinator.cluster.journal_check import FIRST_RECORD_OFFSET  # noqa: E402
from coordinator.demo.cluster import LocalCluster  # noqa: E402
from coordinator.ops.admin_client import Refused, Unreachable  # noqa: E402

TASK = "breast_cancer"
ROUND_CONFIG = {"fraction": 1.0, "min_clients": 2, "lr": 0.1, "local_epochs": 1,
                "batch_size": 16, "collect_timeout_s": 20.0, "online_wait_s": 10.0,
                "secure_aggregation": True, "compression": 2.0, "clip": 0.5}
AVAILABLE_WITHIN_S = 5.0


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- damage


def _journal(cluster: LocalCluster, node: str) -> Path:
    return cluster.root / node / "data" / "raft" / "raft.journal"


def _end(journal: Path) -> int:
    return int.from_bytes(journal.read_bytes()[36:40], "little")


def _rewrite(journal: Path, change: Callable[[bytearray], None]) -> None:
    data = bytearray(journal.read_bytes())
    change(data)
    journal.write_bytes(bytes(data))


def _flip(at: Callable[[bytearray, int], int]) -> Callable[[Path], None]:
    def damage(journal: Path) -> None:
        end = _end(journal)
        _rewrite(journal, lambda d: d.__setitem__(at(d, end), d[at(d, end)] ^ 0x5A))
    return damage


def _overwrite_start(fill: Callable[[], bytes]) -> Callable[[Path], None]:
    return lambda journal: _rewrite(journal, lambda d: d.__setitem__(slice(0, 64), fill()))


def _truncate(journal: Path) -> None:
    os.truncate(journal, _end(journal) // 2)


def _term_file(journal: Path) -> None:
    meta = journal.with_name("raft.journal.meta")
    _rewrite(meta, lambda d: d.__setitem__(len(d) // 2, d[len(d) // 2] ^ 0x5A))


JOURNAL_FAULTS: dict[str, Callable[[Path], None]] = {
    "journal_truncated": _truncate,
    "record_garbled": _flip(lambda d, end: FIRST_RECORD_OFFSET + 1),
    "record_edited": _flip(lambda d, end: (FIRST_RECORD_OFFSET + end) // 2),
    "start_random_bytes": _overwrite_start(lambda: os.urandom(64)),
    "start_0xff": _overwrite_start(lambda: b"\xff" * 64),
    "term_file_damaged": _term_file,
}


def _flood(port: int, first: bytes, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    chunk = os.urandom(65536)
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(first)
                while time.monotonic() < deadline:
                    s.sendall(chunk)
        except OSError:
            time.sleep(0.01)


def _many_connections(port: int, seconds: float) -> None:
    """900 connections from 200 loopback addresses, held open: past the per-address and
    total caps, and (the nodes run with few descriptors here) past the node's limit."""
    socks = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(socks) < 900:
        try:
            s = socket.socket()
            s.settimeout(1)
            s.bind((f"127.0.0.{2 + len(socks) % 200}", 0))
            s.connect(("127.0.0.1", port))
            socks.append(s)
        except OSError:
            time.sleep(0.01)
    time.sleep(max(0.0, deadline - time.monotonic()))
    for s in socks:
        s.close()


PORT_FAULTS: dict[str, Callable[[int], None]] = {
    "raft_huge_frame": lambda port: _flood(port, struct.pack("i", 2**31 - 1), 6.0),
    "raft_garbage": lambda port: _flood(port, os.urandom(64), 6.0),
    "raft_fd_exhaustion": lambda port: _many_connections(port, 6.0),
}
BLOB_FAULTS = ("blob_corrupt_leader", "blob_corrupt_follower")
AUDIT_FAULTS = ("audit_tail_truncated",)
DISK_FAULTS = ("disk_full",)
ALL_FAULTS = (*JOURNAL_FAULTS, *BLOB_FAULTS, *PORT_FAULTS, *AUDIT_FAULTS, *DISK_FAULTS)

DISK_NODE, DISK_MB, DISK_MIN_FREE_MB = "n1", 128, 32
"""The disk-full kind: n1's data directory is a 128 MiB tmpfs in a mount namespace of its
own, and n1 takes no work below 32 MiB free (until 64 MiB are free again)."""


def _own_disk(data_dir: Path) -> list[str]:
    """argv prefix: run the node (same pid: every step execs) with `data_dir` on a small
    tmpfs that only it sees."""
    data_dir.mkdir(parents=True, exist_ok=True)
    script = (f'mount -t tmpfs -o size={DISK_MB}m fedraft-disk "{data_dir}" && '
              f'exec env FEDRAFT_LIMITS_MIN_FREE_MB={DISK_MIN_FREE_MB} "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]


# ---------------------------------------------------------------- one cluster per kind


class Trial:
    """A fault kind's cluster, its writer, and the checks every trial shares."""

    def __init__(self, root: Path, nofile: int | None = None, own_disk: bool = False) -> None:
        prefix = {} if nofile is None else {
            f"n{i}": ["prlimit", f"--nofile={nofile}:{nofile}"] for i in (1, 2, 3)}
        if own_disk:
            prefix[DISK_NODE] = _own_disk(root / DISK_NODE / "data")
        self.cluster = LocalCluster(root, num_nodes=3, election=(1.0, 2.0), prefix=prefix)
        self.cluster.start_nodes()
        self.cluster.wait_leader(60)
        sites = [f"site-{i}" for i in range(3)]
        for s in sites:
            self.cluster.add_site(s)
        self.cluster.init_model(TASK)
        for i, s in enumerate(sites):
            self.cluster.start_site(s, self.cluster.write_site_config(s, TASK, i, 3, "iid"))
        self.cluster.admin.call("Train", {"rounds": 10_000, "config": ROUND_CONFIG})
        self.writer = Writer(self.cluster, "w", rate=10.0, timeout=3.0)
        self.writer.start()

    def close(self) -> None:
        self.writer.stop()
        self.cluster.stop()

    def leader(self) -> str:
        return self.cluster.wait_leader(30)

    def follower(self) -> str:
        lead = self.leader()
        return next(n.id for n in self.cluster.nodes if n.id != lead)

    def acked_after(self, t0: float, within: float = AVAILABLE_WITHIN_S) -> bool:
        """Whether a write was acknowledged between the fault and `within` seconds later."""
        before = len(self.writer.snapshot())
        deadline = t0 + within
        while time.monotonic() < deadline:
            if len(self.writer.snapshot()) > before:
                return True
            time.sleep(0.05)
        return False

    def sites_of(self, node: str) -> set[str] | None:
        try:
            listed = self.cluster.admin.all_sites(endpoint=self.cluster.admin_of(node))
        except (Unreachable, Refused):
            return None
        return {s["site"] for s in listed}

    def caught_up(self, node: str, timeout: float = 60.0) -> float | None:
        """Seconds until `node` holds every acknowledged write, or None."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            have = self.sites_of(node)
            if have is not None and set(self.writer.snapshot()) <= have:
                return time.monotonic() - t0
            time.sleep(0.2)
        return None

    def lost(self) -> int:
        """Acknowledged writes missing from the node that misses most (after 30 s each)."""
        acked = set(self.writer.snapshot())
        missing = 0
        for n in self.cluster.nodes:
            if self.caught_up(n.id, 30.0) is None:
                missing = max(missing, len(acked - (self.sites_of(n.id) or set())))
        return missing

    def fedraft(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "coordinator", *args], capture_output=True,
                              text=True, env=self.cluster.env, timeout=120)


def journal_trial(t: Trial, damage: Callable[[Path], None]) -> dict[str, Any]:
    victim = t.follower()
    c = t.cluster
    c.node_procs[victim].stop()
    damage(_journal(c, victim))
    t0 = time.monotonic()
    available = t.acked_after(t0)
    c.start_node(victim)
    proc = c.node_procs[victim].popen
    try:
        code = proc.wait(30) if proc is not None else None
    except subprocess.TimeoutExpired:
        code = None  # it started on a damaged journal: that is the failure measured
    served = code is None and t.sites_of(victim) is not None
    log = (c.root / victim / "node.log").read_text(errors="replace")
    detected = code == 5 and "Raft journal is damaged" in log
    recovered = None
    if detected:
        config = str(c.root / victim / "node.toml")
        if t.fedraft("node", "recover", "--config", config).returncode == 0:
            c.start_node(victim)
            back = t.caught_up(victim)
            recovered = None if back is None else time.monotonic() - t0
    elif code is None:
        c.node_procs[victim].stop()
    return {"available": available, "served": served, "detected": detected,
            "recovered_s": recovered}


def blob_trial(t: Trial, on_leader: bool) -> dict[str, Any]:
    c = t.cluster
    victim = t.leader() if on_leader else t.follower()
    head = c.admin.round_status()["versions"][-1]["hash"]
    path = next((c.blob_dir(victim)).rglob(head + "*"), None)
    if path is None:
        return {"available": True, "served": False, "detected": False, "recovered_s": None}
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    t0 = time.monotonic()
    before = c.admin.round_status()["last_round"]
    try:  # what a site or a peer does: read it (the leader reads its base every round)
        c.admin.call("GetBlob", {"hash": head}, endpoint=c.admin_of(victim))
    except (Unreachable, Refused):
        pass
    available = t.acked_after(t0)
    recovered = None
    while time.monotonic() - t0 < 60:
        intact = path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == head
        if intact and c.admin.round_status()["last_round"] > before:
            recovered = time.monotonic() - t0
            break
        time.sleep(0.2)
    log = (c.root / victim / "node.log").read_text(errors="replace")
    return {"available": available, "served": False, "detected": "quarantin" in log,
            "recovered_s": recovered}


def port_trial(t: Trial, attack: Callable[[int], None]) -> dict[str, Any]:
    c = t.cluster
    victim = t.leader()
    port = int(next(n.raft for n in c.nodes if n.id == victim).rsplit(":", 1)[1])
    log_path = c.root / victim / "node.log"
    before = log_path.stat().st_size
    t0 = time.monotonic()
    thread = threading.Thread(target=attack, args=(port,), daemon=True)
    thread.start()
    available = t.acked_after(t0)
    thread.join(30)
    with open(log_path, "rb") as fh:
        fh.seek(before)
        new = fh.read().decode(errors="replace")
    detected = "Raft connection" in new or "Raft listener" in new
    return {"available": available, "served": False, "detected": detected,
            "recovered_s": 0.0 if t.leader() else None}


def _audit_head(t: Trial, out: Path) -> int | None:
    """Export the cluster's committed signed audit head to `out`; its tree size."""
    c = t.cluster
    ok = t.fedraft("cluster", "audit-head", "--out", str(out), "--ca", str(c.operator.ca),
                   "--cert", str(c.operator.cert), "--key", str(c.operator.key),
                   "--admin", ",".join(n.admin for n in c.nodes))
    return json.loads(out.read_text())["audit_head"]["tree_size"] if ok.returncode == 0 else None


def _audit_damage(t: Trial, node: str) -> str | None:
    try:
        reply = t.cluster.admin.call("Status", endpoint=t.cluster.admin_of(node))
    except (Unreachable, Refused):
        return None
    return reply.get("audit_damaged")


def audit_trial(t: Trial, work: Path) -> dict[str, Any]:
    """Cut a follower's audit tail and its checkpoints while it runs. Detected twice: the
    node names it (Status `audit_damaged`, within its 2 s check) and `audit verify --head`
    fails. Recovered: after a restart (the node rebuilds its log from its Raft journal),
    its log verifies against a head committed after the restart."""
    c = t.cluster
    victim = t.follower()
    t0 = time.monotonic()
    size = _audit_head(t, work / "head.json")
    if size is None:
        return {"available": t.acked_after(t0), "served": False, "detected": False,
                "recovered_s": None}
    db = c.audit_db(victim).removeprefix("sqlite:///")
    with sqlite3.connect(db, timeout=10) as conn:
        for table in ("audit_entries", "audit_checkpoints"):
            conn.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")
        conn.execute("DELETE FROM audit_entries WHERE seq >= ?", (size - 3,))
        conn.execute("DELETE FROM audit_checkpoints")
    t0 = time.monotonic()
    available = t.acked_after(t0)
    verify = t.fedraft("audit", "verify", "--db", c.audit_db(victim), "--no-charges",
                       "--head", str(work / "head.json"))
    named = None
    while named is None and time.monotonic() - t0 < 10:
        named = _audit_damage(t, victim)
        time.sleep(0.2)
    detected = verify.returncode == 1 and named is not None
    c.node_procs[victim].stop()
    c.start_node(victim)
    recovered = None
    while recovered is None and time.monotonic() - t0 < 90:
        time.sleep(1.0)
        if t.caught_up(victim, 5.0) is None or _audit_head(t, work / "after.json") is None:
            continue
        if t.fedraft("audit", "verify", "--db", c.audit_db(victim), "--no-charges",
                     "--head", str(work / "after.json")).returncode == 0:
            recovered = time.monotonic() - t0
    return {"available": available, "served": False, "detected": detected,
            "recovered_s": recovered}


def disk_trial(t: Trial) -> dict[str, Any]:
    """Fill n1's own disk (leader or not) to 16 MiB free, then free it again. It must
    stop taking work (a leader hands leadership over) and name it; the majority keeps
    committing; once space is back it takes work again and catches up."""
    c = t.cluster
    proc = c.node_procs[DISK_NODE].popen
    assert proc is not None
    data = Path(f"/proc/{proc.pid}/root") / c.root.relative_to("/") / DISK_NODE / "data"
    log_path = c.root / DISK_NODE / "node.log"
    before = log_path.stat().st_size
    fill = data / "fill"
    t0 = time.monotonic()
    with open(fill, "wb") as fh:
        chunk = b"\0" * (1 << 20)
        while True:
            st = os.statvfs(data)
            if st.f_bavail * st.f_frsize <= (DISK_MIN_FREE_MB // 2) << 20:
                break
            fh.write(chunk)
            fh.flush()
    available = t.acked_after(t0)
    time.sleep(max(0.0, t0 + 6.0 - time.monotonic()))
    served = t.leader() == DISK_NODE  # still leading 6 s after its disk filled

    def said(text: str) -> bool:
        with open(log_path, "rb") as fh:
            fh.seek(before)
            return text in fh.read().decode(errors="replace")

    detected = said("disk full")
    fill.unlink()
    deadline = time.monotonic() + 60
    while not said("disk space is back") and time.monotonic() < deadline:
        time.sleep(0.2)
    back = t.caught_up(DISK_NODE, 60.0) if said("disk space is back") else None
    return {"available": available, "served": served, "detected": detected,
            "recovered_s": None if back is None else time.monotonic() - t0}


FD_LIMIT = 256
"""Descriptors the nodes get in the fd-exhaustion runs (a node uses about 100)."""


def run_kind(kind: str, trials: int, work: Path) -> dict[str, Any]:
    t = Trial(work / kind, nofile=FD_LIMIT if kind == "raft_fd_exhaustion" else None,
              own_disk=kind in DISK_FAULTS)
    rows = []
    try:
        time.sleep(3.0)  # a few rounds and writes before the first fault
        for i in range(trials):
            if kind in JOURNAL_FAULTS:
                row = journal_trial(t, JOURNAL_FAULTS[kind])
            elif kind in BLOB_FAULTS:
                row = blob_trial(t, kind == "blob_corrupt_leader")
            elif kind in PORT_FAULTS:
                row = port_trial(t, PORT_FAULTS[kind])
            elif kind in DISK_FAULTS:
                row = disk_trial(t)
            else:
                row = audit_trial(t, work / kind)
            say(f"  {kind} trial {i + 1}: {row}")
            rows.append(row)
        lost = t.lost()
    finally:
        t.close()
    recovered = [r["recovered_s"] for r in rows]
    return {"fault": kind, "trials": trials,
            "cluster_available": sum(r["available"] for r in rows),
            "stale_or_diverged_served": sum(r["served"] for r in rows),
            "acknowledged_lost": lost, "detected": sum(r["detected"] for r in rows),
            "recovered_s": max((r for r in recovered if r is not None), default=None),
            "recovered": sum(r is not None for r in recovered)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--faults", default=",".join(ALL_FAULTS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    kinds = [k for k in args.faults.split(",") if k]
    unknown = set(kinds) - set(ALL_FAULTS)
    if unknown:
        ap.error(f"unknown faults {sorted(unknown)}; known: {', '.join(ALL_FAULTS)}")
    work = Path(tempfile.mkdtemp(prefix="fedraft-faults-"))
    cases = []
    try:
        for kind in kinds:
            say(f"{kind}: {args.trials} trials ...")
            cases.append(run_kind(kind, args.trials, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    totals = {
        "unavailable": sum(c["trials"] - c["cluster_available"] for c in cases),
        "stale_served": sum(c["stale_or_diverged_served"] for c in cases),
        "acknowledged_lost": sum(c["acknowledged_lost"] for c in cases),
        "undetected": sum(c["trials"] - c["detected"] for c in cases),
    }
    not_recovered = sum(c["trials"] - c["recovered"] for c in cases)
    print(f"{'fault':<24}{'trials':>7}{'avail':>7}{'stale':>7}{'lost':>6}{'detect':>8}"
          f"{'recov':>7}{'max s':>8}")
    for c in cases:
        rs = "-" if c["recovered_s"] is None else f"{c['recovered_s']:.1f}"
        print(f"{c['fault']:<24}{c['trials']:>7}{c['cluster_available']:>7}"
              f"{c['stale_or_diverged_served']:>7}{c['acknowledged_lost']:>6}{c['detected']:>8}"
              f"{c['recovered']:>7}{rs:>8}")
    result = {"cases": cases, **totals, "not_recovered": not_recovered}
    if args.json:
        print(json.dumps(result))
    return 0 if not any(totals.values()) and not not_recovered else 1


if __name__ == "__main__":
    sys.exit(main())
