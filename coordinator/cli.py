"""`fedraft`: the operator's command line.

This module builds the root app and mounts the command groups; each group lives in its
own module under `coordinator.commands`.

Exit codes: 0 done; 1 the cluster refused or the command failed (the error is printed, in
one line); 2 bad usage or configuration; 3 no node answered; 4 a wait timed out.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from coordinator.audit.cli import audit_app
from coordinator.commands.certs import certs_app
from coordinator.commands.cluster import cluster_app
from coordinator.commands.common import crash_exit
from coordinator.commands.demo import demo
from coordinator.commands.models import model_app
from coordinator.commands.node import node_app
from coordinator.commands.privacy import privacy_app
from coordinator.commands.rounds import round_app
from coordinator.commands.runs import run_app
from coordinator.commands.sites import client_app

# errors are reported by main() in one line: a rich trace would print local variables
app = typer.Typer(help="fedraft coordinator: nodes, sites, rounds, models.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.add_typer(audit_app, name="audit", help="Query and verify the audit log (auditors).")
for sub, name in ((node_app, "node"), (cluster_app, "cluster"), (client_app, "client"),
                  (run_app, "run"), (round_app, "round"), (model_app, "model"), (certs_app, "certs"),
                  (privacy_app, "privacy")):
    app.add_typer(sub, name=name)
app.command("demo")(demo)


def main() -> None:
    import faulthandler
    import signal as _signal

    faulthandler.register(_signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack
    from coordinator.lifeline import bind_to_parent

    bind_to_parent()
    if not sys.stdout.isatty():  # piped or captured: tables are not cut at 80 columns
        os.environ.setdefault("COLUMNS", "200")
    logging.getLogger("pysyncobj").setLevel(logging.WARNING)
    try:
        app()
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:  # a failure no command turned into its own message
        sys.exit(crash_exit(exc))
