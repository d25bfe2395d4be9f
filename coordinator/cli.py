"""`fedraft`: the operator's command line.

Exit codes: 0 done; 1 the cluster refused (the reply's error is printed); 2 bad usage
or configuration; 3 no node answered; 4 a wait timed out.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from coordinator import pki, wire
from coordinator.admin_client import AdminClient, Refused, Unreachable, load_operator_config
from coordinator.config import ConfigError

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 1, 2, 3, 4

app = typer.Typer(help="fedraft coordinator: nodes, sites, rounds, models.", no_args_is_help=True)
node_app = typer.Typer(help="Run a coordinator node.", no_args_is_help=True)
cluster_app = typer.Typer(help="Inspect the Raft cluster and change its members.", no_args_is_help=True)
client_app = typer.Typer(help="Enroll, list and revoke client sites; set their budgets.",
                         no_args_is_help=True)
round_app = typer.Typer(help="Start and follow training rounds.", no_args_is_help=True)
model_app = typer.Typer(help="Upload the genesis model, export versions.", no_args_is_help=True)
certs_app = typer.Typer(help="A federation CA and role certificates.", no_args_is_help=True)
privacy_app = typer.Typer(help="The replicated privacy ledger.", no_args_is_help=True)
from coordinator.audit.cli import audit_app  # noqa: E402

app.add_typer(audit_app, name="audit", help="Query and verify the audit log (auditors).")
for sub, name in ((node_app, "node"), (cluster_app, "cluster"), (client_app, "client"),
                  (round_app, "round"), (model_app, "model"), (certs_app, "certs"),
                  (privacy_app, "privacy")):
    app.add_typer(sub, name=name)

console = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="operator TOML (env FEDRAFT_CONFIG)")]
AdminOpt = Annotated[str | None, typer.Option("--admin", help="host:port[,host:port] (env FEDRAFT_ADMIN)")]
CaOpt = Annotated[Path | None, typer.Option("--ca", help="CA certificate (env FEDRAFT_CA)")]
CertOpt = Annotated[Path | None, typer.Option("--cert", help="operator certificate (env FEDRAFT_CERT)")]
KeyOpt = Annotated[Path | None, typer.Option("--key", help="operator key (env FEDRAFT_KEY)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]


def _client(config: Path | None, admin: str | None, ca: Path | None, cert: Path | None,
            key: Path | None) -> AdminClient:
    try:
        return AdminClient(load_operator_config(config, admin, ca, cert, key))
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(EXIT_USAGE) from None


def _run(fn: Any) -> Any:
    """Map cluster errors to exit codes with a clear message."""
    try:
        return fn()
    except Refused as exc:
        err.print(f"[red]refused ({exc.code}):[/] {exc}")
        raise typer.Exit(EXIT_REFUSED) from None
    except Unreachable as exc:
        err.print(f"[red]unreachable:[/] {exc}")
        raise typer.Exit(EXIT_UNREACHABLE) from None


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, sort_keys=True, default=str))


# ------------------------------------------------------------------ node


@node_app.command("start")
def node_start(
    config: Annotated[Path, typer.Option("--config", "-c", envvar="FEDRAFT_NODE_CONFIG",
                                         help="node TOML")],
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
    json_logs: Annotated[bool, typer.Option(
        "--json-logs", help="one JSON object per log line (or [log] json = true)")] = False,
) -> None:
    """Run one coordinator node until SIGTERM or SIGINT."""
    from coordinator.config import load_node_config
    from coordinator.logs import setup_logging
    from coordinator.node import Node

    setup_logging(log_level, json_logs)
    try:
        cfg = load_node_config(config)
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    if cfg.log_json and not json_logs:
        setup_logging(log_level, True)
    node = Node(cfg)
    node.start()
    node.wait()


# ------------------------------------------------------------------ cluster


@cluster_app.command("status")
def cluster_status(config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None,
                   cert: CertOpt = None, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Leader, term, commit index, nodes and clients online."""
    c = _client(config, admin, ca, cert, key)
    first = _run(lambda: c.call("Status"))
    nodes = []
    for n in first["nodes"]:
        try:
            if not n["admin"]:  # added moments ago, its endpoints not recorded yet
                raise Unreachable(f"no admin endpoint recorded for {n['id']}")
            s = c.call("Status", endpoint=n["admin"])
            nodes.append({"id": n["id"], "state": s["raft"]["state"], "term": s["raft"]["term"],
                          "commit_index": s["raft"]["commit_index"], "reachable": True,
                          "admin": n["admin"]})
            if s["raft"]["state"] == "leader":
                first = s
        except (Unreachable, Refused):
            nodes.append({"id": n["id"], "reachable": False, "admin": n["admin"]})
    leader_status = first
    out = {
        "leader": leader_status["leader"], "term": leader_status["raft"]["term"],
        "commit_index": leader_status["raft"]["commit_index"], "nodes": nodes,
        "clients_online": leader_status.get("clients_online"),
        "sites_enrolled": leader_status["state"]["sites"],
        "last_round": leader_status["state"]["last_round"],
        "leader_changes": leader_status["state"]["leader_changes"],
    }
    if as_json:
        _emit(out)
        return
    t = Table(title=f"leader {out['leader']}  term {out['term']}  commit {out['commit_index']}")
    for col in ("node", "state", "term", "commit index", "admin"):
        t.add_column(col)
    for n in nodes:
        t.add_row(n["id"], n.get("state", "[red]unreachable[/]"), str(n.get("term", "-")),
                  str(n.get("commit_index", "-")), n["admin"] or "-")
    console.print(t)
    online = out["clients_online"]
    console.print(f"sites enrolled {out['sites_enrolled']}, online "
                  f"{len(online) if online is not None else '?'}: {', '.join(online or [])}")


ChangeTimeoutOpt = Annotated[float, typer.Option(
    "--timeout", min=1.0, max=300.0, help="seconds the change may take")]


def _membership(fn: Any, as_json: bool, done: Any) -> None:
    """Run one membership change: 0 done, 1 refused, 3 unreachable, 4 timed out."""
    try:
        r = fn()
    except Refused as exc:
        if as_json:
            _emit(exc.reply)
        err.print(f"[red]refused ({exc.code}):[/] {exc}")
        raise typer.Exit(EXIT_TIMEOUT if exc.code == "timeout" else EXIT_REFUSED) from None
    except Unreachable as exc:
        err.print(f"[red]unreachable:[/] {exc}")
        raise typer.Exit(EXIT_UNREACHABLE) from None
    _emit(r) if as_json else console.print(done(r))


def _node_address(value: str, what: str) -> str:
    from coordinator.config import host_port

    try:
        return host_port(value, what)
    except ConfigError as exc:
        err.print(f"[red]usage error:[/] {exc}")
        raise typer.Exit(EXIT_USAGE) from None


@cluster_app.command("add-node")
def cluster_add_node(
    node: Annotated[str, typer.Argument(help="the new node's Raft HOST:PORT")],
    node_admin: Annotated[str | None, typer.Option(
        "--node-admin", help="the new node's admin host:port (default: found among the admin "
        "endpoints)")] = None,
    timeout: ChangeTimeoutOpt = 30.0,
    config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None, cert: CertOpt = None,
    key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Add a running node (started with every member and itself as peers) to the cluster."""
    raft = _node_address(node, "node")
    node_admin = None if node_admin is None else _node_address(node_admin, "--node-admin")
    c = _client(config, admin, ca, cert, key)
    _membership(lambda: c.add_node(raft, node_admin, timeout), as_json, lambda r: (
        f"added [bold]{r['node_id']}[/] ({r['node']}); members: {', '.join(r['members'])}"
        + ("" if r.get("caught_up") else " [yellow](still catching up)[/]")))


@cluster_app.command("remove-node")
def cluster_remove_node(
    node: Annotated[str, typer.Argument(help="the member's Raft HOST:PORT (or its id)")],
    transfer: Annotated[bool, typer.Option(
        help="if it is the leader, hand leadership to another member first")] = True,
    timeout: ChangeTimeoutOpt = 30.0,
    config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None, cert: CertOpt = None,
    key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Remove a member from the cluster; then stop its process."""
    c = _client(config, admin, ca, cert, key)
    _membership(lambda: c.remove_node(node, transfer, timeout), as_json, lambda r: (
        (f"leadership handed to {r['transferred_to']}; " if r.get("transferred_to") else "")
        + f"removed [bold]{r['node_id']}[/] ({r['node']}); members: {', '.join(r['members'])}"
        + "; stop its process now"))


@cluster_app.command("transfer-leader")
def cluster_transfer_leader(
    node: Annotated[str | None, typer.Argument(
        help="the member to lead (id or Raft HOST:PORT); default: the most caught-up")] = None,
    timeout: ChangeTimeoutOpt = 30.0,
    config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None, cert: CertOpt = None,
    key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Hand Raft leadership to another member (before maintenance on the leader)."""
    c = _client(config, admin, ca, cert, key)
    _membership(lambda: c.transfer_leader(node, timeout), as_json, lambda r: (
        f"leader is now [bold]{r['leader']}[/]" if r.get("changed")
        else f"[bold]{r['leader']}[/] already leads"))


# ------------------------------------------------------------------ clients


def _read_key(public_key: str) -> str:
    p = Path(public_key)
    text = p.read_text().strip() if p.exists() else public_key.strip()
    if text.startswith("-----BEGIN"):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        k = serialization.load_pem_public_key(text.encode())
        if not isinstance(k, Ed25519PublicKey):
            raise typer.BadParameter("not an Ed25519 public key")
        return k.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    return text.lower()


BundleOpt = Annotated[Path | None, typer.Option(
    "--bundle", help="also write the site's enrollment bundle here (0600; needs --ca-dir)")]
CaDirOpt = Annotated[Path | None, typer.Option(
    "--ca-dir", envvar="FEDRAFT_CA_DIR", help="CA directory (ca.pem, ca.key) that issues the "
    "site's TLS certificate")]
FleetOpt = Annotated[str | None, typer.Option(
    "--fleet", envvar="FEDRAFT_FLEET", help="fleet host:port[,host:port] sites dial (default: "
    "the nodes' fleet addresses from cluster status)")]
CertDaysOpt = Annotated[int, typer.Option("--cert-days", min=1, help="TLS certificate validity")]


@client_app.command("enroll")
def client_enroll(
    site: Annotated[str, typer.Argument(help="site id, e.g. hospital-a")],
    public_key: Annotated[str, typer.Option(help="Ed25519 public key: hex or a PEM file "
                                            "(fedraft-client keygen prints it)")],
    epsilon: Annotated[float, typer.Option(help="the site's privacy budget epsilon")] = 8.0,
    delta: Annotated[float, typer.Option(help="the site's privacy budget delta")] = 1e-5,
    bundle: BundleOpt = None, ca_dir: CaDirOpt = None, fleet: FleetOpt = None,
    cert_days: CertDaysOpt = 365,
    config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None, cert: CertOpt = None,
    key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Enroll a site's identity key; only enrolled sites may take part in rounds.

    With --bundle, also issue the site's TLS certificate and write the one file the site
    imports (`fedraft-client import`); it is built before enrolling, so a bad CA dir or
    endpoint enrolls nothing.
    """
    c = _client(config, admin, ca, cert, key)
    pub = _read_key(public_key)
    made = None if bundle is None else _site_bundle(
        c, site, pub, bundle, ca_dir, fleet, epsilon, delta, cert_days)
    r = _run(lambda: c.call("Enroll", {"site": site, "public_key": pub,
                                       "epsilon": epsilon, "delta": delta}))
    if bundle is not None and made is not None:
        r = r | _write_site_bundle(bundle, made)
    _emit(r) if as_json else console.print(f"enrolled [bold]{site}[/]" + (
        f"; bundle {bundle} (CA sha256 {r['ca_sha256']})" if bundle is not None else ""))


def _site_bundle(c: AdminClient, site: str, public_key: str, path: Path, ca_dir: Path | None,
                 fleet: str | None, epsilon: float, delta: float, days: int) -> dict[str, Any]:
    """Build a site's bundle, or exit 2 naming what is wrong, before anything is enrolled."""
    from coordinator import bundle as bundles

    try:
        if ca_dir is None:
            raise bundles.BundleError("--bundle needs --ca-dir (the CA that issues the site's "
                                      "TLS certificate)")
        bundles.check_bundle_target(path)
        bundles.check_ca_dir(ca_dir)
        nodes = (bundles.parse_endpoints(fleet) if fleet
                 else bundles.fleet_from_status(_run(lambda: c.call("Status"))))
        return bundles.build_bundle(ca_dir, site, public_key, nodes, epsilon, delta, days)
    except bundles.BundleError as exc:
        err.print(f"[red]bundle:[/] {exc}")
        raise typer.Exit(EXIT_USAGE) from None


def _write_site_bundle(path: Path, made: dict[str, Any]) -> dict[str, Any]:
    from coordinator import bundle as bundles

    try:
        bundles.write_bundle(path, made)
    except OSError as exc:
        err.print(f"[red]bundle not written:[/] {exc}; `fedraft client bundle {made['site']}` "
                  "makes a new one")
        raise typer.Exit(EXIT_USAGE) from None
    return {"bundle": str(path), "ca_sha256": bundles.ca_fingerprint(made["ca_pem"].encode()),
            "nodes": made["nodes"]}


@client_app.command("bundle")
def client_bundle(
    site: Annotated[str, typer.Argument(help="an enrolled, unrevoked site id")],
    bundle: Annotated[Path, typer.Option("--bundle", help="where to write it (0600, new file)")],
    ca_dir: CaDirOpt = None, fleet: FleetOpt = None, cert_days: CertDaysOpt = 365,
    config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None, cert: CertOpt = None,
    key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """A new bundle with a freshly issued TLS certificate for an enrolled site (rotation,
    or a lost bundle); the identity key and budget stay as enrolled."""
    c = _client(config, admin, ca, cert, key)
    rec = next((s for s in _run(lambda: c.call("Sites"))["sites"] if s["site"] == site), None)
    if rec is None or rec["revoked"]:
        err.print(f"[red]site {site!r} is {'revoked' if rec else 'not enrolled'}[/]")
        raise typer.Exit(EXIT_REFUSED)
    made = _site_bundle(c, site, rec["public_key"], bundle, ca_dir, fleet,
                        rec["budget"]["epsilon"], rec["budget"]["delta"], cert_days)
    out = {"site": site} | _write_site_bundle(bundle, made)
    _emit(out) if as_json else console.print(
        f"bundle {bundle} for [bold]{site}[/] (CA sha256 {out['ca_sha256']})")


@client_app.command("budget")
def client_budget(
    site: Annotated[str, typer.Argument(help="an enrolled site id")],
    epsilon: Annotated[float, typer.Option(help="the site's new privacy budget epsilon (not "
                                           "below what it has spent)")],
    delta: Annotated[float | None, typer.Option(help="a new delta; only before the site's "
                                                "first charge (default: keep it)")] = None,
    config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None, cert: CertOpt = None,
    key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Change a site's privacy budget; the change is recorded in the audit log."""
    c = _client(config, admin, ca, cert, key)
    r = _run(lambda: c.set_budget(site, epsilon, delta))
    if as_json:
        _emit(r)
    elif not r.get("changed", True):
        console.print(f"budget of [bold]{site}[/] unchanged: epsilon {epsilon:g}, "
                      f"delta {r['budget']['delta']:g}")
    else:
        old, new = r["old_budget"], r["budget"]
        console.print(f"budget of [bold]{site}[/]: epsilon {old['epsilon']:g} -> "
                      f"{new['epsilon']:g}, delta {old['delta']:g} -> {new['delta']:g} "
                      f"(spent {r['spent']:.4g})")


@client_app.command("revoke")
def client_revoke(site: str, config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None,
                  cert: CertOpt = None, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Revoke a site: it is refused from now on and never sampled again."""
    c = _client(config, admin, ca, cert, key)
    r = _run(lambda: c.call("Revoke", {"site": site}))
    _emit(r) if as_json else console.print(f"revoked [bold]{site}[/]")


@client_app.command("list")
def client_list(config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None,
                cert: CertOpt = None, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Enrolled sites, revoked or not, and whether the leader saw them recently."""
    c = _client(config, admin, ca, cert, key)
    ep = _run(c.leader_endpoint)
    r = _run(lambda: c.call("Sites", endpoint=ep) if ep else c.call("Sites"))
    if as_json:
        _emit({"sites": r["sites"]})
        return
    t = Table("site", "status", "online", "public key")
    for s in r["sites"]:
        t.add_row(s["site"], "[red]revoked[/]" if s["revoked"] else "enrolled",
                  "yes" if s["online"] else "no", s["public_key"][:16] + "…")
    console.print(t)


# ------------------------------------------------------------------ models


@model_app.command("init")
def model_init(path: Annotated[Path, typer.Argument(help="safetensors file of float32 tensors")],
               config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None,
               cert: CertOpt = None, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Upload version 0 (fedraft-client init-model --task T writes one)."""
    c = _client(config, admin, ca, cert, key)
    data = path.read_bytes()
    r = _run(lambda: c.call("InitModel", {"data": data}))
    _emit(r) if as_json else console.print(f"genesis model {r['version']}")


@model_app.command("export")
def model_export(version: str, output: Annotated[Path, typer.Option("-o", "--output")],
                 config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None,
                 cert: CertOpt = None, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Write a model version (full sha256, a unique prefix, or 'latest') to a file."""
    c = _client(config, admin, ca, cert, key)
    st = _run(lambda: c.call("RoundStatus"))
    hashes = [v["hash"] for v in st["versions"]]
    if version == "latest" and hashes:
        matches = [hashes[-1]]
    else:
        matches = [h for h in hashes if h.startswith(version.lower())]
    if len(matches) != 1:
        err.print(f"[red]{'no' if not matches else 'ambiguous'} version {version!r}[/]")
        raise typer.Exit(EXIT_REFUSED)
    r = _run(lambda: c.call("GetBlob", {"hash": matches[0]}))
    if wire.sha256_hex(r["data"]) != matches[0]:
        err.print("[red]the node sent bytes that do not match the version hash[/]")
        raise typer.Exit(EXIT_REFUSED)
    output.write_bytes(r["data"])
    out = {"version": matches[0], "path": str(output), "bytes": len(r["data"])}
    _emit(out) if as_json else console.print(f"wrote {output} ({len(r['data'])} bytes)")


# ------------------------------------------------------------------ rounds


def _round_config(clients: int | None, fraction: float | None, min_clients: int | None,
                  local_epochs: int | None, lr: float | None, batch_size: int | None,
                  collect_timeout: float | None) -> dict[str, Any]:
    pairs = {"clients": clients, "fraction": fraction, "min_clients": min_clients,
             "local_epochs": local_epochs, "lr": lr, "batch_size": batch_size,
             "collect_timeout_s": collect_timeout}
    return {k: v for k, v in pairs.items() if v is not None}


def _parse_settings(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs, each VALUE read as a TOML value (0.9, true, 10); the cluster
    checks keys and types and names a bad one."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"--set {item!r}: {raw!r} is not a number, true/false or a "
                              "quoted string") from None
    return out


def follow_rounds(c: AdminClient, target: int, timeout: float, show: bool) -> dict[str, Any]:
    """Poll round status until `target` is committed; a live progress bar when `show`."""
    deadline = time.monotonic() + timeout
    st = _run(lambda: c.call("RoundStatus"))
    start_round = st["last_round"]
    progress = Progress(TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} rounds"), TimeElapsedColumn(),
                        console=err, disable=not show)
    with progress:
        bar = progress.add_task("training", total=max(0, target - start_round))
        while True:
            try:
                ep = c.leader_endpoint()
                st = c.call("RoundStatus", endpoint=ep) if ep else c.call("RoundStatus")
            except (Unreachable, Refused):
                time.sleep(0.5)
                if time.monotonic() > deadline:
                    break
                continue
            p = st.get("progress")
            desc = "training"
            if p:
                desc = (f"round {p['round']}.{p['attempt']} {p['stage']}: "
                        f"{len(p['submitted'])}/{len(p['participants'])} updates")
            progress.update(bar, completed=st["last_round"] - start_round, description=desc)
            if st["last_round"] >= target or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    return st


@round_app.command("start")
def round_start(
    rounds: Annotated[int, typer.Option("--rounds", "-n", min=1, help="rounds to run")] = 1,
    clients: Annotated[int | None, typer.Option("--clients", "-k", min=1,
                                                help="sites sampled per round")] = None,
    fraction: Annotated[float | None, typer.Option(help="fraction of sites per round")] = None,
    min_clients: Annotated[int | None, typer.Option(min=1, help="fewest updates to commit")] = None,
    local_epochs: Annotated[int | None, typer.Option(min=1)] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    collect_timeout: Annotated[float | None, typer.Option(help="seconds for updates")] = None,
    settings: Annotated[list[str] | None, typer.Option(
        "--set", help="any round configuration key, KEY=VALUE (repeatable), e.g. "
        "--set compression=100 --set residual_decay=0.9")] = None,
    wait: Annotated[bool, typer.Option(help="follow progress until the rounds commit")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to follow before giving up")] = 3600,
    config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None, cert: CertOpt = None,
    key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Ask the cluster for N more rounds and follow them with a live progress display."""
    c = _client(config, admin, ca, cert, key)
    try:
        extra = _parse_settings(settings or [])
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    cfg = extra | _round_config(
        clients, fraction, min_clients, local_epochs, lr, batch_size, collect_timeout)
    r = _run(lambda: c.call("Train", {"rounds": rounds, "config": cfg}))
    target = r["target_round"]
    if not wait:
        _emit(r) if as_json else console.print(f"training until round {target}")
        return
    st = follow_rounds(c, target, timeout, show=not as_json)
    summary = {"target_round": target, "last_round": st["last_round"],
               "versions": [v["hash"] for v in st["versions"]]}
    if as_json:
        _emit(summary)
    else:
        _print_history(st)
    if st["last_round"] < target:
        raise typer.Exit(EXIT_TIMEOUT)


def _print_history(st: dict[str, Any], last: int = 20) -> None:
    t = Table("round", "attempts", "leader", "survivors", "base acc", "train loss", "s", "version")
    rounds = sorted(int(k) for k in st["history"])[-last:]
    for r in rounds:
        h = st["history"][str(r)]
        c = h["committed"]
        if c is None:
            t.add_row(str(r), str(len(h["aborted"])), "-", "-", "-", "-", "-", "(open)")
            continue
        m = c["metrics"]
        t.add_row(str(r), str(c["attempt"]), c.get("leader") or "-",
                  f"{len(c['survivors'])}/{len(c['participants'])}",
                  f"{m.get('base_accuracy', float('nan')):.3f}",
                  f"{m.get('train_loss', float('nan')):.3f}", f"{m.get('seconds', 0):.1f}",
                  c["version"][:12])
    console.print(t)


@round_app.command("status")
def round_status(config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None,
                 cert: CertOpt = None, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Committed rounds, the open round and its progress on the leader."""
    c = _client(config, admin, ca, cert, key)
    ep = _run(c.leader_endpoint)
    st = _run(lambda: c.call("RoundStatus", endpoint=ep) if ep else c.call("RoundStatus"))
    if as_json:
        _emit(st)
        return
    _print_history(st)
    p = st.get("progress")
    console.print(f"last round {st['last_round']}, target {st['target_round']}" + (
        f"; round {p['round']}.{p['attempt']} {p['stage']} "
        f"{len(p['submitted'])}/{len(p['participants'])} updates" if p else ""))


# ------------------------------------------------------------------ privacy


@privacy_app.command("ledger")
def privacy_ledger(
    site: Annotated[str | None, typer.Option(help="only this site")] = None,
    plot: Annotated[Path | None, typer.Option(help="write a PNG of epsilon over rounds")] = None,
    config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None, cert: CertOpt = None,
    key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Spent and remaining epsilon per site, every charge (aborted attempts included)."""
    c = _client(config, admin, ca, cert, key)
    sites = _run(lambda: c.call("Sites"))["sites"]
    if site is not None:
        sites = [s for s in sites if s["site"] == site]
        if not sites:
            err.print(f"[red]no site {site!r}[/]")
            raise typer.Exit(EXIT_REFUSED)
    rows = [{"site": s["site"], "epsilon_budget": s["budget"]["epsilon"],
             "delta": s["budget"]["delta"], "epsilon_spent": s["spent"],
             "epsilon_remaining": max(0.0, s["budget"]["epsilon"] - s["spent"]),
             "charges": s["charges"]} for s in sites]
    if plot is not None:
        _plot_ledger(rows, plot)
    if as_json:
        _emit({"sites": rows})
        return
    t = Table("site", "budget ε", "δ", "spent ε", "remaining ε", "charges")
    for r in rows:
        t.add_row(r["site"], f"{r['epsilon_budget']:.3g}", f"{r['delta']:.0e}",
                  f"{r['epsilon_spent']:.3f}", f"{r['epsilon_remaining']:.3f}",
                  str(len(r["charges"])))
    console.print(t)
    if plot is not None:
        console.print(f"plot written to {plot}")


def _plot_ledger(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        xs = [c["round"] + (c["attempt"] - 1) * 0.1 for c in r["charges"]]
        ax.step([0, *xs], [0.0, *(c["epsilon_total"] for c in r["charges"])], where="post",
                label=r["site"])
    budgets = {r["epsilon_budget"] for r in rows}
    for b in budgets:
        ax.axhline(b, linestyle="--", color="grey", linewidth=1)
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent (PRV)")
    ax.set_title("privacy ledger")
    if rows:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ certificates


@certs_app.command("init")
def certs_init(directory: Annotated[Path, typer.Argument(help="where ca.pem and ca.key go")]) -> None:
    """Create a federation CA (keep ca.key offline in production)."""
    try:
        path = pki.init_ca(directory)
    except FileExistsError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(EXIT_USAGE) from None
    console.print(f"CA certificate {path}")


@certs_app.command("issue")
def certs_issue(
    role: Annotated[str, typer.Argument(help="node, client, operator or auditor")],
    name: Annotated[str, typer.Argument(help="common name, e.g. n1 or hospital-a")],
    ca_dir: Annotated[Path, typer.Option("--ca-dir", help="directory holding ca.pem/ca.key")],
    out: Annotated[Path, typer.Option("--out", help="output directory")] = Path("."),
    host: Annotated[list[str] | None, typer.Option("--host", help="SAN (repeat)")] = None,
) -> None:
    """Issue a key and certificate for one party, its role bound into the certificate."""
    if role not in pki.ROLES:
        err.print(f"[red]role must be one of {', '.join(pki.ROLES)}[/]")
        raise typer.Exit(EXIT_USAGE)
    ident = pki.issue(ca_dir, out, role, name, tuple(host or ("127.0.0.1", "localhost")))
    console.print(f"{ident.cert} and {ident.key}")


# ------------------------------------------------------------------ demo


@app.command("demo")
def demo(
    rounds: Annotated[int, typer.Option(min=1)] = 10,
    sites: Annotated[int, typer.Option(min=2)] = 5,
    workdir: Annotated[Path, typer.Option(help="nodes' data, logs and audit databases")] = Path(
        "demo-run"),
    kill_leader: Annotated[bool, typer.Option(help="SIGKILL the leader mid-run")] = True,
    as_json: JsonOpt = False,
) -> None:
    """3 nodes and 5 sites on 127.0.0.1 train breast cancer; the leader is killed mid-run."""
    from coordinator.demo import run_demo

    result = run_demo(rounds=rounds, sites=sites, workdir=workdir, kill_leader=kill_leader,
                      quiet=as_json)
    if as_json:
        _emit(result)
    if result.get("error"):
        raise typer.Exit(EXIT_REFUSED)


def main() -> None:
    import faulthandler
    import signal as _signal

    faulthandler.register(_signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack
    from coordinator.lifeline import bind_to_parent

    bind_to_parent()
    logging.getLogger("pysyncobj").setLevel(logging.WARNING)
    try:
        app()
    except BrokenPipeError:
        sys.exit(0)
