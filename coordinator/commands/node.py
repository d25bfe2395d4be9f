"""`fedraft node`: run a coordinator node."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from coordinator.cluster.config import ConfigError
from coordinator.commands.common import EXIT_DAMAGED, EXIT_REFUSED, EXIT_USAGE, JsonOpt, emit, err

ConfigArg = Annotated[Path, typer.Option("--config", "-c", envvar="FEDRAFT_NODE_CONFIG",
                                         help="node TOML")]

node_app = typer.Typer(help="Run a coordinator node.", no_args_is_help=True)


@node_app.command("start")
def node_start(
    config: ConfigArg,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
    json_logs: Annotated[bool, typer.Option(
        "--json-logs", "--json",
        help="one JSON object per log line (or [log] json = true)")] = False,
) -> None:
    """Run one coordinator node until SIGTERM or SIGINT."""
    # imported here: the node (and what it pulls in) loads only when a node is started
    from coordinator.audit.errors import AuditIntegrityError
    from coordinator.cluster.config import load_node_config
    from coordinator.cluster.journal_check import JournalDamaged
    from coordinator.cluster.logs import setup_logging
    from coordinator.node import Node

    setup_logging(log_level, json_logs)
    try:
        cfg = load_node_config(config)
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_USAGE) from None
    if cfg.log_json and not json_logs:
        setup_logging(log_level, True)
    try:
        node = Node(cfg)
        node.start()
    except JournalDamaged as exc:
        err.print(f"[red]node {cfg.self_addr.id} will not start: its Raft journal is damaged:[/] "
                  f"{escape(str(exc))}; run `fedraft node recover --config {escape(str(config))}` "
                  "to move it aside and rejoin from the peers")
        raise typer.Exit(EXIT_DAMAGED) from None
    except AuditIntegrityError as exc:  # one it could not set aside and rebuild by itself
        err.print(f"[red]node {cfg.self_addr.id} will not start: its audit log is damaged:[/] "
                  f"{escape(str(exc))}")
        raise typer.Exit(EXIT_DAMAGED) from None
    except (OSError, ValueError) as exc:  # a key, certificate, database or address it cannot use
        err.print(f"[red]node {cfg.self_addr.id} cannot start:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_USAGE) from None
    node.wait()


@node_app.command("recover")
def node_recover(
    config: ConfigArg,
    force: Annotated[bool, typer.Option(
        help="move the journal aside even though it checks out")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Move a stopped node's damaged Raft journal (and snapshot) aside, so that it rejoins
    from its peers.

    The node then starts with an empty log, holds no election until the leader contacts
    it, and takes the leader's snapshot and the commands after it; its blobs and its
    audit log stay (appends are idempotent, and entries the snapshot covers are copied
    from a peer). Recover one node at a time, and only a stopped node:
    with its journal the node also forgets its vote. Exit 1 when the journal is intact
    (unless --force), 2 on a bad configuration.
    """
    from datetime import UTC, datetime

    from coordinator.cluster.config import load_node_config
    from coordinator.cluster.journal_check import JournalDamaged, check_raft_dir
    from coordinator.cluster.replica import REJOIN_MARKER
    from coordinator.cluster.snapshot import check_snapshot

    try:
        cfg = load_node_config(config)
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_USAGE) from None
    raft_dir = cfg.data_dir / "raft"
    try:
        records = check_raft_dir(raft_dir / "raft.journal")
        check_snapshot(raft_dir, records[0].index if records else None)
        damage = None
    except JournalDamaged as exc:
        damage = str(exc)
    if damage is None and not force:
        err.print(f"node {cfg.self_addr.id}: its Raft journal checks out; nothing to recover "
                  "(--force moves it aside anyway)")
        raise typer.Exit(EXIT_REFUSED)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = cfg.data_dir / f"raft.damaged-{stamp}"
    if raft_dir.exists():
        raft_dir.rename(aside)
    raft_dir.mkdir(mode=0o700)
    (raft_dir / REJOIN_MARKER).write_text(f"recovered {stamp}: {damage or 'forced'}\n")
    result = {"node": cfg.self_addr.id, "damage": damage, "moved_to": str(aside)}
    if as_json:
        emit(result)
        return
    typer.echo(f"node {cfg.self_addr.id}: moved its Raft journal to {aside}; start the node "
               "and it rejoins from its peers")
