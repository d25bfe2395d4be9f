"""`fedraft node`: run a coordinator node."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from coordinator.cluster.config import ConfigError
from coordinator.commands.common import EXIT_USAGE, err

node_app = typer.Typer(help="Run a coordinator node.", no_args_is_help=True)


@node_app.command("start")
def node_start(
    config: Annotated[Path, typer.Option("--config", "-c", envvar="FEDRAFT_NODE_CONFIG",
                                         help="node TOML")],
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
    json_logs: Annotated[bool, typer.Option(
        "--json-logs", help="one JSON object per log line (or [log] json = true)")] = False,
) -> None:
    """Run one coordinator node until SIGTERM or SIGINT."""
    # imported here: the node (and what it pulls in) loads only when a node is started
    from coordinator.cluster.config import load_node_config
    from coordinator.cluster.logs import setup_logging
    from coordinator.node import Node

    setup_logging(log_level, json_logs)
    try:
        cfg = load_node_config(config)
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    if cfg.log_json and not json_logs:
        setup_logging(log_level, True)
    try:
        node = Node(cfg)
        node.start()
    except (OSError, ValueError) as exc:  # a key, certificate, database or address it cannot use
        err.print(f"[red]node {cfg.self_addr.id} cannot start:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_USAGE) from None
    node.wait()
