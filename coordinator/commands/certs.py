"""`fedraft certs`: a federation CA and role certificates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from coordinator.cluster import pki
from coordinator.commands.common import EXIT_USAGE, JsonOpt, console, emit, err

certs_app = typer.Typer(help="A federation CA and role certificates.", no_args_is_help=True)


@certs_app.command("init")
def certs_init(directory: Annotated[Path, typer.Argument(help="where ca.pem and ca.key go")],
               as_json: JsonOpt = False) -> None:
    """Create a federation CA (keep ca.key offline in production)."""
    try:
        path = pki.init_ca(directory)
    except FileExistsError as exc:
        err.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(EXIT_USAGE) from None
    except OSError as exc:
        err.print(f"[red]cannot create the CA: {escape(str(exc.strerror or exc))}: {exc.filename}[/]")
        raise typer.Exit(EXIT_USAGE) from None
    if as_json:
        emit({"ca_cert": str(path), "ca_key": str(path.with_name("ca.key"))})
    else:
        console.print(f"CA certificate {path}")


@certs_app.command("issue")
def certs_issue(
    role: Annotated[str, typer.Argument(help="node, client, operator or auditor")],
    name: Annotated[str, typer.Argument(help="common name, e.g. n1 or hospital-a")],
    ca_dir: Annotated[Path, typer.Option("--ca-dir", help="directory holding ca.pem/ca.key")],
    out: Annotated[Path, typer.Option("--out", help="output directory")] = Path("."),
    host: Annotated[list[str] | None, typer.Option("--host", help="SAN (repeat)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Issue a key and certificate for one party, its role bound into the certificate."""
    if role not in pki.ROLES:
        err.print(f"[red]role must be one of {', '.join(pki.ROLES)}[/]")
        raise typer.Exit(EXIT_USAGE)
    try:
        ident = pki.issue(ca_dir, out, role, name, tuple(host or ("127.0.0.1", "localhost")))
    except (FileExistsError, ValueError) as exc:
        err.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(EXIT_USAGE) from None
    except OSError as exc:  # the CA files cannot be read, or --out cannot be written
        err.print(f"[red]cannot issue: {escape(str(exc.strerror or exc))}: {exc.filename}[/]")
        raise typer.Exit(EXIT_USAGE) from None
    if as_json:
        emit({"role": role, "name": name, "cert": str(ident.cert), "key": str(ident.key),
              "ca": str(ident.ca)})
    else:
        console.print(f"{ident.cert} and {ident.key}")
