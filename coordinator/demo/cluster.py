"""A whole federation on one machine, as real processes on 127.0.0.1.

Used by `fedraft demo`, the tests and the simulations: a throwaway CA, N node
processes (`fedraft node start`), site agents (`fedraft-client run`) each with its own
identity key and certificate. It ends only the processes it started, by pid.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import durable, lifeline, wire
from coordinator.audit import AuditSigner
from coordinator.cluster import pki
from coordinator.cluster.config import NodeAddress, render_node_config
from coordinator.ops.admin_client import AdminClient, OperatorConfig, Refused, Unreachable
from coordinator.round.faults import FAULT_HOLD_ENV


def _identity(ca_dir: Path, out: Path, role: str, name: str,
              hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> pki.Identity:
    """The TLS identity in `out`, issued unless a cluster made in this root already did."""
    cert, key = out / f"{name}.pem", out / f"{name}.key"
    if cert.exists() and key.exists():
        return pki.Identity(ca_dir / "ca.pem", cert, key)
    return pki.issue(ca_dir, out, role, name, hosts)


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class Proc:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen | None = None

    def start(self, env: dict[str, str]) -> None:
        fh = open(self.log, "ab")
        self.popen = subprocess.Popen(self.argv, stdout=fh, stderr=subprocess.STDOUT,
                                      env=lifeline.child_env(env), stdin=subprocess.DEVNULL)
        fh.close()

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            os.kill(self.popen.pid, sig)  # type: ignore[union-attr]

    def stop(self, timeout: float = 5.0) -> None:
        if not self.alive:
            return
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(5)  # type: ignore[union-attr]


@dataclass
class LocalCluster:
    root: Path
    num_nodes: int = 3
    election: tuple[float, float] = (0.8, 1.6)
    # where node i binds and is reached (default 127.0.0.1), e.g. its network namespace's
    # address; node certificates name it as an IP subject alt name
    hosts: list[str] | None = None
    # argv prefix per node id or site, e.g. ["ip", "netns", "exec", NS]; it must exec
    # the command in place so the pid we signal is the node's or agent's own
    prefix: dict[str, list[str]] = field(default_factory=dict)
    json_logs: bool = False  # nodes log one JSON object per line (`--json-logs`)
    # tests only: nodes read `stage:seconds` from this file and the leader lingers at that
    # stage (coordinator.round.faults); set before the nodes start, changed with `hold`
    fault_hold: bool = False
    snapshot_entries: int | None = None  # the nodes' [raft] snapshot_entries (None: default)
    nodes: list[NodeAddress] = field(default_factory=list)
    metrics_addrs: dict[str, str] = field(default_factory=dict)  # node id -> /metrics host:port
    node_procs: dict[str, Proc] = field(default_factory=dict)
    site_procs: dict[str, Proc] = field(default_factory=dict)
    site_keys: dict[str, Ed25519PrivateKey] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ca_dir = self.root / "ca"
        self.password = secrets.token_hex(24)
        self.env = {**os.environ, "FEDRAFT_RAFT_PASSWORD": self.password,
                    "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        # the cluster's sites share one noise-multiplier cache, kept with the cluster
        self.env.setdefault("FEDRAFT_CACHE_DIR", str(self.root / "cache"))
        self.hold_file = self.root / "fault-hold"
        if self.fault_hold:
            self.hold_file.write_text("")
            self.env[FAULT_HOLD_ENV] = str(self.hold_file)
        if not (self.ca_dir / "ca.pem").exists():
            pki.init_ca(self.ca_dir)
        self.operator = _identity(self.ca_dir, self.root / "operator", "operator", "operator")
        self.audit_key = self.root / "audit-key.pem"
        if not self.audit_key.exists():
            AuditSigner.generate().save(self.audit_key)
        ports = free_ports(4 * self.num_nodes)  # raft, fleet, admin per node, then metrics
        for i in range(self.num_nodes):
            r, f, a = ports[3 * i: 3 * i + 3]
            host = self.hosts[i] if self.hosts else "127.0.0.1"
            self.nodes.append(NodeAddress(f"n{i + 1}", f"{host}:{r}", f"{host}:{f}",
                                          f"{host}:{a}"))
            self.metrics_addrs[f"n{i + 1}"] = f"{host}:{ports[3 * self.num_nodes + i]}"
        for node in self.nodes:
            d = self.root / node.id
            host = node.raft.rpartition(":")[0]
            ident = _identity(self.ca_dir, d / "tls", "node", node.id,
                              hosts=tuple(dict.fromkeys((host, "127.0.0.1", "localhost"))))
            (d / "node.toml").write_text(render_node_config(
                node, [p for p in self.nodes if p != node], d / "data", ident.ca, ident.cert,
                ident.key, self.election, self.audit_key, self.metrics_addrs[node.id],
                snapshot_entries=self.snapshot_entries))
            self.node_procs[node.id] = Proc(
                node.id, [*self.prefix.get(node.id, []), sys.executable, "-m", "coordinator",
                          "node", "start", "--config", str(d / "node.toml"),
                          *(["--json-logs"] if self.json_logs else [])], d / "node.log")
        self.admin = AdminClient(OperatorConfig(tuple(n.admin for n in self.nodes), self.operator),
                                 timeout=10)

    # ------------------------------------------------------------ nodes

    def start_nodes(self) -> None:
        for p in self.node_procs.values():
            p.start(self.env)

    def start_node(self, node_id: str) -> None:
        self.node_procs[node_id].start(self.env)

    def new_node(self, peers: list[str] | None = None) -> NodeAddress:
        """Prepare (not start) one more node on 127.0.0.1 for `fedraft cluster add-node`.

        Its node.toml lists `peers` (node ids; default every node so far) as a node
        joining a running cluster must: every current member plus itself."""
        node_id = f"n{len(self.nodes) + 1}"
        r, f, a = free_ports(3)
        node = NodeAddress(node_id, f"127.0.0.1:{r}", f"127.0.0.1:{f}", f"127.0.0.1:{a}")
        members = [n for n in self.nodes if peers is None or n.id in peers]
        d = self.root / node_id
        ident = _identity(self.ca_dir, d / "tls", "node", node_id)
        (d / "node.toml").write_text(render_node_config(
            node, members, d / "data", ident.ca, ident.cert, ident.key, self.election,
            self.audit_key, join=True))
        self.nodes.append(node)
        self.node_procs[node_id] = Proc(
            node_id, [sys.executable, "-m", "coordinator", "node", "start", "--config",
                      str(d / "node.toml"), *(["--json-logs"] if self.json_logs else [])],
            d / "node.log")
        return node

    def kill_node(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        p = self.node_procs[node_id]
        p.signal(sig)
        if sig == signal.SIGKILL and p.popen is not None:
            p.popen.wait(5)

    def metrics_url(self, node_id: str) -> str:
        """Where node `node_id` serves Prometheus metrics (plain HTTP)."""
        return f"http://{self.metrics_addrs[node_id]}/metrics"

    def admin_of(self, node_id: str) -> str:
        return next(n.admin for n in self.nodes if n.id == node_id)

    def status(self, node_id: str) -> dict[str, Any] | None:
        try:
            return self.admin.call("Status", endpoint=self.admin_of(node_id))
        except (Unreachable, Refused):
            return None

    def leader(self) -> str | None:
        """The node that is leader and has claimed its term, per the alive nodes."""
        for n in self.nodes:
            if not self.node_procs[n.id].alive:
                continue
            s = self.status(n.id)
            if s and s["raft"]["state"] == "leader" and s["state"]["fence_term"] == s["raft"]["term"]:
                return n.id
        return None

    def wait_leader(self, timeout: float = 30.0, exclude: str | None = None) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.leader()
            if leader and leader != exclude:
                return leader
            time.sleep(0.1)
        raise TimeoutError("no leader elected")

    def hold(self, stage: str | None, seconds: float = 0.0) -> None:
        """Make whichever node leads linger `seconds` at `stage` (None: release), so a test
        can kill the leader there. Needs `fault_hold=True`."""
        if not self.fault_hold:
            raise RuntimeError("this cluster was made without fault_hold=True")
        self.hold_file.write_text(f"{stage}:{seconds}" if stage else "")

    def wait_stage(self, stage: str, timeout: float = 60.0) -> tuple[str, dict[str, Any]]:
        """Wait until the leader's open round is at `stage`; returns (leader id, progress)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.leader()
            try:
                st = self.admin.round_status(endpoint=self.admin_of(leader)) if leader else None
            except (Unreachable, Refused):
                st = None
            progress = (st or {}).get("progress")
            if leader and progress and progress.get("stage") == stage:
                return leader, progress
            time.sleep(0.05)
        raise TimeoutError(f"the leader never reached stage {stage}")

    def round_status(self) -> dict[str, Any]:
        ep = None
        leader = self.leader()
        if leader:
            ep = self.admin_of(leader)
        return self.admin.round_status(endpoint=ep)

    def newest_status(self, pause: float = 1.0) -> dict[str, Any]:
        """The leader's `RoundStatus` of the newest rounds (one reply, no paging), asked
        again every `pause` seconds while no node answers (a leader change): what a
        loop that follows a run polls."""
        while True:
            leader = self.leader()
            try:
                return self.admin.call("RoundStatus",
                                       endpoint=self.admin_of(leader) if leader else None)
            except (Unreachable, Refused):
                time.sleep(pause)

    def wait_round(self, target: int, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                st = self.admin.round_status()
                if st["last_round"] >= target:
                    return st
            except (Unreachable, Refused):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"round {target} not committed in {timeout}s")
            time.sleep(0.2)

    # ------------------------------------------------------------ sites

    def add_site(self, site: str, enroll: bool = True,
                 budget: tuple[float, float] | None = None) -> Ed25519PrivateKey:
        key = Ed25519PrivateKey.generate()
        d = self.root / "sites" / site
        d.mkdir(parents=True, exist_ok=True)
        durable.write_atomic(d / "identity.pem", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), mode=0o600)
        _identity(self.ca_dir, d / "tls", "client", site)
        self.site_keys[site] = key
        if enroll:
            msg = {"site": site, "public_key": wire.public_key_hex(key)}
            if budget is not None:
                msg |= {"epsilon": budget[0], "delta": budget[1]}
            self.admin.call("Enroll", msg)
        return key

    def site_tls(self, site: str) -> tuple[bytes, bytes, bytes]:
        d = self.root / "sites" / site / "tls"
        return ((self.ca_dir / "ca.pem").read_bytes(), (d / f"{site}.pem").read_bytes(),
                (d / f"{site}.key").read_bytes())

    def write_site_config(self, site: str, task: str, partition: int, num_partitions: int,
                          split: str = "dirichlet", alpha: float = 0.5, seed: int = 0,
                          flower_app: str | None = None,
                          privacy: dict[str, float] | None = None) -> Path:
        d = self.root / "sites" / site
        nodes = ", ".join(f'"{n.fleet}"' for n in self.nodes)
        text = f"""[site]
id = "{site}"
nodes = [{nodes}]
state_dir = "{d / 'state'}"
identity_key = "{d / 'identity.pem'}"
poll_wait_s = 5.0

[tls]
ca = "{self.ca_dir / 'ca.pem'}"
cert = "{d / 'tls' / (site + '.pem')}"
key = "{d / 'tls' / (site + '.key')}"

[task]
{f'flower_app = "{flower_app}"' if flower_app else f'name = "{task}"'}
device = "auto"
seed = {seed}

[data]
dataset = "{task}"
partition = {partition}
num_partitions = {num_partitions}
split = "{split}"
alpha = {alpha}
seed = {seed}
"""
        if privacy:
            text += "\n[privacy]\n" + "".join(f"{k} = {v!r}\n" for k, v in privacy.items())
        (d / "site.toml").write_text(text)
        return d / "site.toml"

    def start_site(self, site: str, config: Path) -> None:
        d = self.root / "sites" / site
        proc = Proc(site, [*self.prefix.get(site, []), sys.executable, "-m", "client", "run",
                           "--config", str(config)], d / "agent.log")
        self.site_procs[site] = proc
        proc.start(self.env)

    def init_model(self, task: str, seed: int = 0, flower_app: str | None = None) -> str:
        path = self.root / "genesis.safetensors"
        source = ["--flower-app", flower_app] if flower_app else ["--task", task]
        subprocess.run([sys.executable, "-m", "client", "init-model", *source, "--seed",
                        str(seed), "-o", str(path)], check=True, env=self.env,
                       stdout=subprocess.DEVNULL)
        self.genesis_version: str = self.admin.call("InitModel", {"data": path.read_bytes()})["version"]
        return self.genesis_version

    def export_versions(self, hashes: list[str], out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for h in hashes:
            data = self.admin.call("GetBlob", {"hash": h})["data"]
            if wire.sha256_hex(data) != h:
                raise ValueError(f"blob {h} does not match its hash")
            p = out_dir / f"{h}.safetensors"
            p.write_bytes(data)
            paths.append(p)
        return paths

    def audit_db(self, node_id: str) -> str:
        return f"sqlite:///{self.root / node_id / 'data' / 'audit.db'}"

    def audit_public_key(self) -> Path:
        path = self.root / "audit-key.pub"
        if not path.exists():
            path.write_text(AuditSigner.from_file(self.audit_key).public_key_hex + "\n")
        return path

    def blob_dir(self, node_id: str) -> Path:
        return self.root / node_id / "data" / "blobs"

    def stop(self) -> None:
        """SIGTERM every process at once (and SIGCONT, should a test have stopped one), then
        reap them (SIGKILL after 5 s): the slowest one sets the time, not the sum."""
        procs = [p for p in list(self.site_procs.values()) + list(self.node_procs.values())
                 if p.alive]
        for p in procs:
            p.signal(signal.SIGTERM)
            p.signal(signal.SIGCONT)
        deadline = time.monotonic() + 5.0
        for p in procs:
            try:
                p.popen.wait(max(0.0, deadline - time.monotonic()))  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                p.signal(signal.SIGKILL)
                p.popen.wait(5)  # type: ignore[union-attr]
        self.admin.close()
