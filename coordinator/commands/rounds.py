"""`fedraft round`: start and follow training rounds."""

from __future__ import annotations

import time
import tomllib
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from coordinator.cluster.config import ConfigError
from coordinator.commands.common import (
    EXIT_REFUSED,
    EXIT_TIMEOUT,
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
from coordinator.ops.admin_client import AdminClient, Refused, Unreachable

round_app = typer.Typer(help="Start and follow training rounds.", no_args_is_help=True)


def _round_config(clients: int | None, fraction: float | None, min_clients: int | None,
                  local_epochs: int | None, lr: float | None, batch_size: int | None,
                  collect_timeout: float | None) -> dict[str, Any]:
    pairs = {"clients": clients, "fraction": fraction, "min_clients": min_clients,
             "local_epochs": local_epochs, "lr": lr, "batch_size": batch_size,
             "collect_timeout_s": collect_timeout}
    return {k: v for k, v in pairs.items() if v is not None}


def _parse_settings(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs, each VALUE read as a TOML value (0.9, true, 10); the cluster
    checks keys and types and names a bad one."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"--set {item!r}: {raw!r} is not a number, true/false or a "
                              "quoted string") from None
    return out


def follow_rounds(c: AdminClient, target: int, timeout: float, show: bool) -> dict[str, Any]:
    """Poll round status until `target` is committed; a live progress bar when `show`."""
    deadline = time.monotonic() + timeout
    st = run(lambda: c.call("RoundStatus"))
    start_round = st["last_round"]
    progress = Progress(TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} rounds"), TimeElapsedColumn(),
                        console=err, disable=not show)
    with progress:
        bar = progress.add_task("training", total=max(0, target - start_round))
        while True:
            try:
                ep = c.leader_endpoint()
                st = c.call("RoundStatus", endpoint=ep) if ep else c.call("RoundStatus")
            except (Unreachable, Refused):
                time.sleep(0.5)
                if time.monotonic() > deadline:
                    break
                continue
            p = st.get("progress")
            desc = "training"
            if p:
                desc = (f"round {p['round']}.{p['attempt']} {p['stage']}: "
                        f"{len(p['submitted'])}/{len(p['participants'])} updates")
            progress.update(bar, completed=st["last_round"] - start_round, description=desc)
            stopped = st["target_round"] < target and st["last_round"] >= st["target_round"]
            if st["last_round"] >= target or stopped or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    return st


@round_app.command("start")
def round_start(
    rounds: Annotated[int, typer.Option("--rounds", "-n", min=1, help="rounds to run")] = 1,
    clients: Annotated[int | None, typer.Option("--clients", "-k", min=1,
                                                help="sites sampled per round")] = None,
    fraction: Annotated[float | None, typer.Option(help="fraction of sites per round")] = None,
    min_clients: Annotated[int | None, typer.Option(min=1, help="fewest updates to commit")] = None,
    local_epochs: Annotated[int | None, typer.Option(min=1)] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    collect_timeout: Annotated[float | None, typer.Option(help="seconds for updates")] = None,
    settings: Annotated[list[str] | None, typer.Option(
        "--set", help="any round configuration key, KEY=VALUE (repeatable), e.g. "
        "--set compression=100 --set residual_decay=0.9")] = None,
    wait: Annotated[bool, typer.Option(help="follow progress until the rounds commit")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to follow before giving up")] = 3600,
    config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None, cert: CertOpt = None,
    key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Ask the cluster for N more rounds and follow them with a live progress display."""
    c = operator_client(config, admin, ca, cert, key)
    try:
        extra = _parse_settings(settings or [])
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    cfg = extra | _round_config(
        clients, fraction, min_clients, local_epochs, lr, batch_size, collect_timeout)
    r = run(lambda: c.call("Train", {"rounds": rounds, "config": cfg}))
    target = r["target_round"]
    if not wait:
        emit(r) if as_json else console.print(f"training until round {target}")
        return
    st = follow_rounds(c, target, timeout, show=not as_json)
    stopped = st.get("stopped") if st["target_round"] < target else None
    summary = {"target_round": target, "last_round": st["last_round"],
               "versions": [v["hash"] for v in st["versions"]], "stopped": stopped}
    if as_json:
        emit(summary)
    else:
        _print_history(st)
    if stopped is not None:
        err.print(f"[red]the run stopped at round {st['last_round']} of {target}[/] "
                  f"({_stopped_by(stopped)})")
        raise typer.Exit(EXIT_REFUSED)
    if st["last_round"] < target:
        raise typer.Exit(EXIT_TIMEOUT)


def _stopped_by(stopped: dict[str, Any]) -> str:
    """`by WHO: REASON` of a stopped run (an operator's stop, or the leader's)."""
    who = stopped.get("operator") or stopped.get("node") or "?"
    return f"by {escape(who)}: {escape(stopped['reason'])}"


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
    """Stop the run: the round now open finishes (or is aborted by its own rules), no
    further round starts. Recorded in the audit log with your certificate's name."""
    c = operator_client(config, admin, ca, cert, key)
    r = run(lambda: c.call("Stop", {"reason": reason} if reason else {}))
    if as_json:
        emit(r)
    else:
        console.print(f"stopped: training ends at round {r['target_round']}")


@round_app.command("status")
def round_status(config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None,
                 cert: CertOpt = None, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Committed rounds, the open round and its progress on the leader."""
    c = operator_client(config, admin, ca, cert, key)
    ep = run(c.leader_endpoint)
    st = run(lambda: c.call("RoundStatus", endpoint=ep) if ep else c.call("RoundStatus"))
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
        console.print(f"stopped ({_stopped_by(stopped)})")
