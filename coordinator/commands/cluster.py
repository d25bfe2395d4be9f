"""`fedraft cluster`: inspect the Raft cluster and change its members."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from coordinator import durable
from coordinator.cluster.config import ConfigError
from coordinator.commands.common import (
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    AdminOpt,
    CaOpt,
    CertOpt,
    ConfigOpt,
    JsonOpt,
    KeyOpt,
    console,
    emit,
    err,
    operator_client,
    run,
)
from coordinator.ops.admin_client import Refused, Unreachable

cluster_app = typer.Typer(help="Inspect the Raft cluster and change its members.", no_args_is_help=True)


@cluster_app.command("status")
def cluster_status(config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None,
                   cert: CertOpt = None, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Leader, term, commit index, nodes and clients online. Exit 0 when every member
    answered and the leader has a quorum, 1 when a member is down or there is no quorum
    (the table or JSON says which), 3 when no node answered."""
    c = operator_client(config, admin, ca, cert, key)
    first = run(lambda: c.call("Status"))
    nodes = []
    for n in first["nodes"]:
        try:
            if not n["admin"]:  # added moments ago, its endpoints not recorded yet
                raise Unreachable(f"no admin endpoint recorded for {n['id']}")
            s = c.call("Status", endpoint=n["admin"])
            nodes.append({"id": n["id"], "state": s["raft"]["state"], "term": s["raft"]["term"],
                          "commit_index": s["raft"]["commit_index"], "reachable": True,
                          "admin": n["admin"], "audit_damaged": s.get("audit_damaged")})
            if s["raft"]["state"] == "leader":
                first = s
        except (Unreachable, Refused):
            nodes.append({"id": n["id"], "reachable": False, "admin": n["admin"]})
    leader_status = first
    out = {
        "leader": leader_status["leader"], "term": leader_status["raft"]["term"],
        "commit_index": leader_status["raft"]["commit_index"], "nodes": nodes,
        "clients_online": leader_status.get("clients_online"),
        "clients_online_first": leader_status.get("clients_online_first"),
        "sites_enrolled": leader_status["state"]["sites"],
        "last_round": leader_status["state"]["last_round"],
        "leader_changes": leader_status["state"]["leader_changes"],
    }
    down = [n["id"] for n in nodes if not n["reachable"]]
    quorum = bool(leader_status["raft"].get("has_quorum")) and leader_status["leader"] is not None
    out["healthy"] = not down and quorum
    if as_json:
        emit(out)
        if not out["healthy"]:
            raise typer.Exit(EXIT_REFUSED)
        return
    t = Table(title=f"leader {out['leader']}  term {out['term']}  commit {out['commit_index']}")
    for col in ("node", "state", "term", "commit index", "admin", "audit log"):
        t.add_column(col)
    for n in nodes:
        audit = "-" if not n["reachable"] else (
            f"[red]damaged: {escape(n['audit_damaged'])}[/]" if n.get("audit_damaged") else "ok")
        t.add_row(n["id"], n.get("state", "[red]unreachable[/]"), str(n.get("term", "-")),
                  str(n.get("commit_index", "-")), n["admin"] or "-", audit)
    console.print(t)
    online, first = out["clients_online"], out["clients_online_first"] or []
    console.print(f"sites enrolled {out['sites_enrolled']}, online "
                  f"{online if online is not None else '?'}"
                  + (f": {escape(', '.join(first))}" if first else "")
                  + (", …" if online and online > len(first) else ""))
    if not out["healthy"]:
        err.print("[red]degraded:[/] " + "; ".join(
            ([f"unreachable: {', '.join(down)}"] if down else [])
            + ([] if quorum else ["the leader has no quorum"])))
        raise typer.Exit(EXIT_REFUSED)


ChangeTimeoutOpt = Annotated[float, typer.Option(
    "--timeout", min=1.0, max=300.0, help="seconds the change may take")]


def _membership(fn: Callable[[], Any], as_json: bool, done: Callable[[Any], str]) -> None:
    """Run one membership change: 0 done, 1 refused, 3 unreachable, 4 timed out."""
    try:
        r = fn()
    except Refused as exc:
        if as_json:
            emit(exc.reply)
        err.print(f"[red]refused ({exc.code}):[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_TIMEOUT if exc.code == "timeout" else EXIT_REFUSED) from None
    except Unreachable as exc:
        err.print(f"[red]unreachable:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_UNREACHABLE) from None
    emit(r) if as_json else console.print(done(r))


def _node_address(value: str, what: str) -> str:
    from coordinator.cluster.config import host_port

    try:
        return host_port(value, what)
    except ConfigError as exc:
        err.print(f"[red]usage error:[/] {escape(str(exc))}")
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
    c = operator_client(config, admin, ca, cert, key)
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
    c = operator_client(config, admin, ca, cert, key)
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
    c = operator_client(config, admin, ca, cert, key)
    _membership(lambda: c.transfer_leader(node, timeout), as_json, lambda r: (
        f"leader is now [bold]{r['leader']}[/]" if r.get("changed")
        else f"[bold]{r['leader']}[/] already leads"))


@cluster_app.command("audit-head")
def cluster_audit_head(
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="also write the head as JSON to this file (for `fedraft audit "
        "verify --head`)", dir_okay=False)] = None,
    config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None, cert: CertOpt = None,
    key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """The signed audit head the cluster committed through Raft: its size and Merkle root.

    `fedraft audit verify --head FILE` checks any node's log, or an export, against it,
    which catches a tail deleted with its checkpoint rows and a log re-signed under
    another key. Exit 1 when no head is committed yet.
    """
    c = operator_client(config, admin, ca, cert, key)
    head = run(lambda: c.call("Status"))["state"].get("audit_head")
    if head is None:
        err.print("[red]no audit head committed yet:[/] the cluster has written no audit "
                  "entry since it started publishing heads")
        raise typer.Exit(EXIT_REFUSED)
    if out is not None:
        try:
            durable.write_atomic(out, (json.dumps({"audit_head": head}, sort_keys=True) + "\n")
                                 .encode(), mode=0o644)
        except OSError as exc:
            err.print(f"[red]cannot write {out}:[/] {escape(str(exc.strerror or exc))}")
            raise typer.Exit(EXIT_USAGE) from None
    if as_json:
        emit({"audit_head": head})
        return
    console.print(f"audit head: {head['tree_size']} entries, root {head['root_hash']}, "
                  f"key {head['key_id']}" + (f"; written to {out}" if out else ""))
