"""`fedraft round`: the short forms of `fedraft run` (start, stop) and round status."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from coordinator.commands.common import (
    AdminOpt,
    CaOpt,
    CertOpt,
    ConfigOpt,
    JsonOpt,
    KeyOpt,
    console,
    emit,
    operator_client,
    run,
)
from coordinator.commands.runs import (
    BatchOpt,
    ClientsOpt,
    CollectOpt,
    EpochsOpt,
    FractionOpt,
    LrOpt,
    MinClientsOpt,
    RoundsOpt,
    SetOpt,
    TimeoutOpt,
    WaitOpt,
    leader_status,
    round_config,
    start_run,
    stop_run,
    stopped_by,
)

round_app = typer.Typer(help="Start and follow training rounds.", no_args_is_help=True)


@round_app.command("start")
def round_start(
    rounds: RoundsOpt = 1, clients: ClientsOpt = None, fraction: FractionOpt = None,
    min_clients: MinClientsOpt = None, local_epochs: EpochsOpt = None, lr: LrOpt = None,
    batch_size: BatchOpt = None, collect_timeout: CollectOpt = None, settings: SetOpt = None,
    wait: WaitOpt = True, timeout: TimeoutOpt = 3600, config: ConfigOpt = None,
    admin: AdminOpt = None, ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a run of N rounds from the newest model and follow it (`fedraft run start`
    with the default name); refused while another run is running."""
    c = operator_client(config, admin, ca, cert, key)
    cfg = round_config(clients, fraction, min_clients, local_epochs, lr, batch_size,
                       collect_timeout, settings)
    start_run(c, rounds, cfg, name=None, task=None, model=None, wait=wait, timeout=timeout,
              as_json=as_json)


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


@round_app.command("stop")
def round_stop(
    reason: Annotated[str | None, typer.Option(help="why, for the audit log")] = None,
    config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None, cert: CertOpt = None,
    key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Stop the running run (`fedraft run stop`): its open attempt is aborted and no
    further round starts. Recorded in the audit log with your certificate's name."""
    stop_run(operator_client(config, admin, ca, cert, key), None, reason, as_json)


@round_app.command("status")
def round_status(config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None,
                 cert: CertOpt = None, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Committed rounds, the open round and its progress on the leader."""
    c = operator_client(config, admin, ca, cert, key)
    st = run(lambda: leader_status(c))
    if as_json:
        emit(st)
        return
    _print_history(st)
    p = st.get("progress")
    console.print(f"last round {st['last_round']}, target {st['target_round']}" + (
        f"; round {p['round']}.{p['attempt']} {p['stage']} "
        f"{len(p['submitted'])}/{len(p['participants'])} updates" if p else ""))
    stopped = st.get("stopped")
    if stopped and st["last_round"] >= st["target_round"]:
        console.print(f"stopped ({stopped_by(stopped)})")
