"""`fedraft model`: upload the genesis model, export versions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from coordinator import wire
from coordinator.commands.common import (
    EXIT_REFUSED,
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

model_app = typer.Typer(help="Upload the genesis model, export versions.", no_args_is_help=True)


@model_app.command("init")
def model_init(path: Annotated[Path, typer.Argument(help="safetensors file of float32 tensors")],
               config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None,
               cert: CertOpt = None, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Upload version 0 (fedraft-client init-model --task T writes one); a later run
    that starts from a fresh model uploads it with `fedraft run start --model`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        err.print(f"[red]cannot read the model file[/] {path}: {escape(str(exc.strerror or exc))}")
        raise typer.Exit(EXIT_USAGE) from None
    c = operator_client(config, admin, ca, cert, key)
    r = run(lambda: c.call("InitModel", {"data": data}))
    emit(r) if as_json else console.print(f"genesis model {r['version']}")


@model_app.command("export")
def model_export(version: str, output: Annotated[Path, typer.Option("-o", "--output")],
                 config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None,
                 cert: CertOpt = None, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Write a model version (full sha256, a unique prefix, or 'latest') to a file."""
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir() or output.is_dir():
        err.print(f"[red]cannot write {output}:[/] " + (
            "it is a directory" if output.is_dir() else f"no directory {folder}"))
        raise typer.Exit(EXIT_USAGE)
    c = operator_client(config, admin, ca, cert, key)
    st = run(lambda: c.round_status())
    hashes = [v["hash"] for v in st["versions"]]
    if version == "latest" and hashes:
        matches = [hashes[-1]]
    else:
        matches = [h for h in hashes if h.startswith(version.lower())]
    if len(matches) != 1:
        err.print(f"[red]{'no' if not matches else 'ambiguous'} version {version!r}[/]")
        raise typer.Exit(EXIT_REFUSED)
    r = run(lambda: c.call("GetBlob", {"hash": matches[0]}))
    if wire.sha256_hex(r["data"]) != matches[0]:
        err.print("[red]the node sent bytes that do not match the version hash[/]")
        raise typer.Exit(EXIT_REFUSED)
    output.write_bytes(r["data"])
    out = {"version": matches[0], "path": str(output), "bytes": len(r["data"])}
    emit(out) if as_json else console.print(f"wrote {output} ({len(r['data'])} bytes)")
