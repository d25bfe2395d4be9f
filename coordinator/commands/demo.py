"""`fedraft demo`: a local federation that loses its leader mid-run (a command, not a
group; `coordinator.cli` registers it on the root app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.commands.common import EXIT_REFUSED, JsonOpt, emit


def demo(
    rounds: Annotated[int, typer.Option(min=1)] = 10,
    sites: Annotated[int, typer.Option(min=2)] = 5,
    workdir: Annotated[Path, typer.Option(help="nodes' data, logs and audit databases")] = Path(
        "demo-run"),
    kill_leader: Annotated[bool, typer.Option(help="SIGKILL the leader mid-run")] = True,
    as_json: JsonOpt = False,
) -> None:
    """3 nodes and 5 sites on 127.0.0.1 train breast cancer; the leader is killed mid-run."""
    from coordinator.demo.run import run_demo

    result = run_demo(rounds=rounds, sites=sites, workdir=workdir, kill_leader=kill_leader,
                      quiet=as_json)
    if as_json:
        emit(result)
    if result.get("error"):
        raise typer.Exit(EXIT_REFUSED)
