"""Node configuration: TOML on disk, environment overrides, errors that name the key.

An environment variable FEDRAFT_<SECTION>_<KEY> (upper case) overrides `[section] key`,
e.g. FEDRAFT_RAFT_PASSWORD keeps the Raft secret out of the file.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.cluster.throttle import DEFAULT_ADMIN, DEFAULT_FLEET, Limit

MAX_DEFAULT_UNMASK_WORKERS = 3


def default_unmask_workers() -> int:
    """The leader's unmask helper processes by default: one per spare core, at most 3."""
    return max(0, min(MAX_DEFAULT_UNMASK_WORKERS, (os.cpu_count() or 1) - 1))


class ConfigError(ValueError):
    """A bad configuration value; the message starts with the dotted key."""


@dataclass(frozen=True)
class NodeAddress:
    id: str
    raft: str
    fleet: str
    admin: str


@dataclass(frozen=True)
class NodeConfig:
    self_addr: NodeAddress
    peers: tuple[NodeAddress, ...]
    data_dir: Path
    ca: Path
    cert: Path
    key: Path
    raft_password: str
    election_min_s: float = 0.8
    election_max_s: float = 1.6
    snapshot_entries: int = 5_000  # journal entries between two compactions (snapshot + trim)
    audit_key: Path | None = None
    audit_db: str = ""
    fleet_workers: int = 64
    unmask_workers: int = field(default_factory=default_unmask_workers)  # helper processes
    metrics_bind: str = ""  # host:port serving Prometheus /metrics; "" is off
    log_json: bool = False
    join: bool = False  # joining a running cluster: start no election until a leader calls
    raft_bind: str = ""  # host:port the Raft port listens on; "" is the node's raft address
    min_free_mb: int = 256  # below this much free disk the node takes no work (until 2x)
    fleet_limit: Limit = DEFAULT_FLEET  # per site certificate, on each node
    admin_limit: Limit = DEFAULT_ADMIN  # per operator, auditor or node certificate
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def all_nodes(self) -> tuple[NodeAddress, ...]:
        return (self.self_addr, *self.peers)


def _env_key(section: str, key: str) -> str:
    return f"FEDRAFT_{section}_{key}".upper().replace("-", "_")


class _Reader:
    def __init__(self, data: dict[str, Any], base: Path) -> None:
        self.data = data
        self.base = base

    def get(self, section: str, key: str, kind: type, default: Any = ...) -> Any:
        env = os.environ.get(_env_key(section, key))
        value = self.data.get(section, {}).get(key, default) if env is None else env
        if value is ...:
            raise ConfigError(f"{section}.{key}: required")
        if env is not None and kind is bool:
            if env.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ConfigError(f"{section}.{key}: expected true or false, got {env!r}")
            value = env.lower() in ("1", "true", "yes", "on")
        if env is not None and kind in (int, float):
            try:
                value = kind(env)
            except ValueError:
                raise ConfigError(f"{section}.{key}: expected {kind.__name__}") from None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise ConfigError(f"{section}.{key}: expected {kind.__name__}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise ConfigError(f"{section}.{key}: expected a finite number, got {value!r}")
        return value

    def number(self, section: str, key: str, kind: type, default: Any, least: float) -> Any:
        """A number of `kind` that is at least `least`."""
        value = self.get(section, key, kind, default)
        if value < least:
            raise ConfigError(f"{section}.{key}: must be >= {least:g}, got {value!r}")
        return value

    def path(self, section: str, key: str) -> Path:
        p = Path(self.get(section, key, str)).expanduser()
        return p if p.is_absolute() else (self.base / p)


_HOST = re.compile(r"[A-Za-z0-9_.:\[\]-]{1,253}")
"""Host names, IPv4 and bracketed IPv6: what the state machine accepts in membership records."""


def host_port(value: Any, where: str) -> str:
    """`value` if it is host:port with a valid port; ConfigError naming `where` if not.

    Also checks node addresses given on the command line and in admin requests."""
    if not isinstance(value, str) or value.count(":") < 1:
        raise ConfigError(f"{where}: expected host:port, got {value!r}")
    host, _, port = value.rpartition(":")
    if (not _HOST.fullmatch(host) or not port.isascii() or not port.isdigit()
            or not 0 < int(port) < 65536):
        raise ConfigError(f"{where}: expected host:port, got {value!r}")
    return value


_hostport = host_port  # the earlier private name


def _address(raw: Any, where: str) -> NodeAddress:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = set(raw) - {"id", "raft", "fleet", "admin", "data_dir"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key")
    if not isinstance(raw.get("id"), str) or not raw["id"]:
        raise ConfigError(f"{where}.id: required")
    return NodeAddress(
        id=raw["id"],
        raft=host_port(raw.get("raft"), f"{where}.raft"),
        fleet=host_port(raw.get("fleet"), f"{where}.fleet"),
        admin=host_port(raw.get("admin"), f"{where}.admin"),
    )


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


SECTIONS: dict[str, frozenset[str]] = {
    "node": frozenset({"id", "raft", "fleet", "admin", "data_dir", "join"}),
    "tls": frozenset({"ca", "cert", "key"}),
    "raft": frozenset({"password", "election_min_s", "election_max_s", "bind",
                      "snapshot_entries"}),
    "audit": frozenset({"key", "db"}),
    "metrics": frozenset({"bind"}),
    "log": frozenset({"json"}),
    "limits": frozenset({"fleet_rps", "fleet_burst", "admin_rps", "admin_burst", "fleet_workers",
                          "unmask_workers", "min_free_mb"}),
}
"""The tables of node.toml and their keys (plus the [[peers]] array): a misspelt key is an
error, not a silently ignored default."""


def _check_sections(data: dict[str, Any]) -> None:
    for section, table in data.items():
        if section == "peers":
            continue
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section")
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table ([{section}])")
        unknown = sorted(set(table) - SECTIONS[section])
        if unknown:
            raise ConfigError(f"{section}.{unknown[0]}: unknown key")


def _limit(r: _Reader, service: str, default: Limit) -> Limit:
    rate = r.number("limits", f"{service}_rps", float, default.rate, 0.0)
    burst = r.number("limits", f"{service}_burst", float, default.burst, 1.0)
    return Limit(rate, burst)


def load_node_config(path: Path) -> NodeConfig:
    data = read_toml(path)
    _check_sections(data)
    r = _Reader(data, Path(path).resolve().parent)
    node = dict(data.get("node", {}))
    for key in ("id", "raft", "fleet", "admin"):
        env = os.environ.get(_env_key("node", key))
        if env is not None:
            node[key] = env
    self_addr = _address({k: v for k, v in node.items() if k not in ("data_dir", "join")},
                         "node")
    peers_raw = data.get("peers", [])
    if not isinstance(peers_raw, list):
        raise ConfigError("peers: expected an array of tables ([[peers]])")
    peers = tuple(_address(p, f"peers[{i}]") for i, p in enumerate(peers_raw))
    ids = [self_addr.id, *(p.id for p in peers)]
    if len(set(ids)) != len(ids):
        raise ConfigError("peers: node ids must be unique")
    password = r.get("raft", "password", str)
    if len(password) < 16:
        raise ConfigError("raft.password: must be at least 16 characters")
    emin = r.get("raft", "election_min_s", float, 0.8)
    emax = r.get("raft", "election_max_s", float, 1.6)
    if not 0.05 <= emin < emax:
        raise ConfigError("raft.election_max_s: must exceed raft.election_min_s (>= 0.05)")
    data_dir = r.path("node", "data_dir")
    audit_db = r.get("audit", "db", str, f"sqlite:///{data_dir / 'audit.db'}")
    if "://" not in audit_db:
        raise ConfigError("audit.db: expected a SQLAlchemy URL (sqlite:///... or postgresql+psycopg://...)")
    raft_bind = r.get("raft", "bind", str, "").strip()
    if raft_bind:
        host_port(raft_bind, "raft.bind")
    metrics_bind = r.get("metrics", "bind", str, "").strip()
    if metrics_bind:
        host_port(metrics_bind, "metrics.bind")
    return NodeConfig(
        self_addr=self_addr,
        peers=peers,
        data_dir=data_dir,
        audit_key=r.path("audit", "key"),
        audit_db=audit_db,
        ca=r.path("tls", "ca"),
        cert=r.path("tls", "cert"),
        key=r.path("tls", "key"),
        raft_password=password,
        election_min_s=emin,
        election_max_s=emax,
        snapshot_entries=r.number("raft", "snapshot_entries", int, 5_000, 2),
        join=r.get("node", "join", bool, False),
        raft_bind=raft_bind,
        metrics_bind=metrics_bind,
        log_json=r.get("log", "json", bool, False),
        fleet_limit=_limit(r, "fleet", DEFAULT_FLEET),
        admin_limit=_limit(r, "admin", DEFAULT_ADMIN),
        fleet_workers=r.number("limits", "fleet_workers", int, 64, 1),
        unmask_workers=r.number("limits", "unmask_workers", int, default_unmask_workers(), 0),
        min_free_mb=r.number("limits", "min_free_mb", int, 256, 0),
    )


def render_node_config(
    self_addr: NodeAddress,
    peers: list[NodeAddress],
    data_dir: Path,
    ca: Path,
    cert: Path,
    key: Path,
    election: tuple[float, float] = (0.8, 1.6),
    audit_key: Path | None = None,
    metrics_bind: str = "",
    join: bool = False,
    snapshot_entries: int | None = None,
) -> str:
    """A node.toml for the given layout; the Raft password comes from the environment."""
    lines = [
        "[node]",
        f'id = "{self_addr.id}"',
        f'data_dir = "{data_dir}"',
        f'raft = "{self_addr.raft}"',
        f'fleet = "{self_addr.fleet}"',
        f'admin = "{self_addr.admin}"',
        *(["# joining a running cluster: passive until the leader adds it (fedraft cluster "
            "add-node)", "join = true"] if join else []),
        "",
        "[tls]",
        f'ca = "{ca}"',
        f'cert = "{cert}"',
        f'key = "{key}"',
        "",
        "[raft]",
        "# password: set FEDRAFT_RAFT_PASSWORD (shared by all nodes, >= 16 characters)",
        f"election_min_s = {election[0]}",
        f"election_max_s = {election[1]}",
        "# journal entries between two compactions (a durable snapshot, then the trim)",
        f"snapshot_entries = {snapshot_entries}" if snapshot_entries else "# snapshot_entries = 5000",
        "",
        "[audit]",
        "# the cluster's audit signing key (Ed25519 PEM), the same on every node",
        f'key = "{audit_key or data_dir / "audit-key.pem"}"',
        "# db defaults to sqlite:///<data_dir>/audit.db; PostgreSQL: postgresql+psycopg://...",
        "",
        "[metrics]",
        "# Prometheus /metrics over plain HTTP: keep it on loopback or a monitoring network",
        f'bind = "{metrics_bind}"' if metrics_bind else '# bind = "127.0.0.1:9464"',
    ]
    for p in peers:
        lines += ["", "[[peers]]", f'id = "{p.id}"', f'raft = "{p.raft}"',
                  f'fleet = "{p.fleet}"', f'admin = "{p.admin}"']
    return "\n".join(lines) + "\n"
