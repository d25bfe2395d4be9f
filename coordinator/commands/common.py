"""What every `fedraft` command group shares: consoles, options, exit codes, helpers.

Exit codes: 0 done; 1 the cluster refused or the command failed (the error is printed);
2 bad usage or configuration; 3 no node answered; 4 a wait timed out; 5 a node's own
storage is damaged (`fedraft node start` refuses to serve it).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from coordinator import wire
from coordinator.cluster.config import ConfigError
from coordinator.ops.admin_client import AdminClient, Refused, Unreachable, load_operator_config

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT, EXIT_DAMAGED = 1, 2, 3, 4, 5

ADMIN_ROLES = ("operator", "auditor", "node")
"""Certificate roles the admin API answers at all (which calls each may make is the node's
business; `cluster status` works for all three)."""

console = Console()
err = Console(stderr=True, soft_wrap=True)  # an error is one line, however long

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="operator TOML (env FEDRAFT_CONFIG)")]
AdminOpt = Annotated[str | None, typer.Option("--admin", help="host:port[,host:port] (env FEDRAFT_ADMIN)")]
CaOpt = Annotated[Path | None, typer.Option("--ca", help="CA certificate (env FEDRAFT_CA)")]
CertOpt = Annotated[Path | None, typer.Option("--cert", help="operator certificate (env FEDRAFT_CERT)")]
KeyOpt = Annotated[Path | None, typer.Option("--key", help="operator key (env FEDRAFT_KEY)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]


def operator_client(config: Path | None, admin: str | None, ca: Path | None, cert: Path | None,
                    key: Path | None) -> AdminClient:
    """The admin client the connection options describe; exit 2 on a configuration error,
    including TLS material the nodes would refuse (named here, not as "unreachable")."""
    try:
        cfg = load_operator_config(config, admin, ca, cert, key)
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_USAGE) from None
    problem = wire.identity_problem(cfg.identity.ca, cfg.identity.cert, cfg.identity.key,
                                    ADMIN_ROLES)
    if problem is not None:
        err.print(f"[red]TLS identity error:[/] {escape(str(problem))}")
        raise typer.Exit(EXIT_USAGE)
    return AdminClient(cfg)


def run(fn: Callable[[], Any]) -> Any:
    """Map cluster errors to exit codes with a clear message."""
    try:
        return fn()
    except Refused as exc:
        err.print(f"[red]refused ({exc.code}):[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_REFUSED) from None
    except Unreachable as exc:
        err.print(f"[red]unreachable:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_UNREACHABLE) from None


def emit(obj: dict[str, Any]) -> None:
    """Print one JSON object (the `--json` output)."""
    print(json.dumps(obj, sort_keys=True, default=str))


def crash_exit(exc: Exception) -> int:
    """Report an error no command turned into its own message, in one line, and return the
    exit code. Never a trace with local variables: they hold secrets (the Raft password, a
    private key). FEDRAFT_DEBUG=1 prints the trace too, without locals."""
    if os.environ.get("FEDRAFT_DEBUG"):
        traceback.print_exception(exc)
    if isinstance(exc, OSError):  # a file or address the operator gave
        where = f": {exc.filename}" if exc.filename else ""
        print(f"fedraft: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USAGE
    print(f"fedraft: {type(exc).__name__}: {exc} (FEDRAFT_DEBUG=1 shows where)", file=sys.stderr)
    return EXIT_REFUSED

