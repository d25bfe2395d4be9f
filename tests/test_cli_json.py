"""Every leaf command of both CLIs accepts --json (scripts never scrape tables)."""

from __future__ import annotations

from collections.abc import Iterator

import click
from typer.main import get_command

from client.cli import app as client_app
from coordinator.cli import app as fedraft_app


def _leaves(cmd: click.Command, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _leaves(sub, (*path, name))
    else:
        yield path, cmd


def test_every_leaf_command_takes_json() -> None:
    leaves = [*_leaves(get_command(fedraft_app), ("fedraft",)),
              *_leaves(get_command(client_app), ("fedraft-client",))]
    assert len(leaves) >= 30
    missing = [" ".join(path) for path, cmd in leaves
               if not any("--json" in p.opts for p in cmd.params if isinstance(p, click.Option))]
    assert missing == []
