"""`fedraft run`: start, list, show and stop training runs.

A run is what an operator asks of the federation: N rounds of a task from a model (the
newest version, or a fresh one given with `--model`), under one round configuration. It
ends `completed`, or `stopped` (by an operator, or by the leader with the reason when
its rounds keep failing). `fedraft round start` / `round stop` are the short forms.
"""

from __future__ import annotations

import math
import time
import tomllib
from pathlib import Path
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

run_app = typer.Typer(help="Start, list, show and stop training runs.", no_args_is_help=True)

RoundsOpt = Annotated[int, typer.Option("--rounds", "-n", min=1, help="rounds to run")]
ClientsOpt = Annotated[int | None, typer.Option("--clients", "-k", min=1,
                                                help="sites sampled per round")]
FractionOpt = Annotated[float | None, typer.Option(help="fraction of sites per round")]
MinClientsOpt = Annotated[int | None, typer.Option(min=1, help="fewest updates to commit")]
EpochsOpt = Annotated[int | None, typer.Option(min=1, help="local epochs per round")]
LrOpt = Annotated[float | None, typer.Option(help="local learning rate")]
BatchOpt = Annotated[int | None, typer.Option(min=1, help="local batch size")]
CollectOpt = Annotated[float | None, typer.Option(help="seconds for updates")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="any round configuration key, KEY=VALUE (repeatable), e.g. "
    "--set compression=100 --set residual_decay=0.9")]
WaitOpt = Annotated[bool, typer.Option(help="follow progress until the run ends")]
TimeoutOpt = Annotated[float, typer.Option(help="seconds to follow before giving up")]


def round_config(clients: int | None, fraction: float | None, min_clients: int | None,
                 local_epochs: int | None, lr: float | None, batch_size: int | None,
                 collect_timeout: float | None, settings: list[str] | None) -> dict[str, Any]:
    """The round configuration the flags ask for (the cluster checks keys and ranges)."""
    pairs = {"clients": clients, "fraction": fraction, "min_clients": min_clients,
             "local_epochs": local_epochs, "lr": lr, "batch_size": batch_size,
             "collect_timeout_s": collect_timeout}
    try:
        extra = _parse_settings(settings or [])
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_USAGE) from None
    return extra | {k: v for k, v in pairs.items() if v is not None}


def _parse_settings(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs, each VALUE read as a TOML value (0.9, true, 10)."""
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


def leader_status(c: AdminClient, from_round: int | None = None,
                  run_id: str | None = None) -> dict[str, Any]:
    """Round status from the leader (its progress is the live one), else any node: the
    newest rounds, or every round from `from_round` (paged); `run_id`'s record is in
    `runs` however old the run."""
    ep = c.leader_endpoint()
    if from_round is not None:
        return c.round_status(endpoint=ep, from_round=from_round, run=run_id)
    return c.call("RoundStatus", {"run": run_id} if run_id else {}, endpoint=ep)


def run_status(c: AdminClient, run_id: str) -> dict[str, Any]:
    """The status with every round of run `run_id` the state holds (for its rows)."""
    st = leader_status(c, run_id=run_id)
    record = _run_of(st, run_id)
    return leader_status(c, record["first_round"], run_id) if record else st


def _run_of(st: dict[str, Any], run_id: str) -> dict[str, Any] | None:
    return next((r for r in st.get("runs", []) if r["id"] == run_id), None)


def follow_run(c: AdminClient, run_id: str, timeout: float, show: bool) -> dict[str, Any]:
    """Poll until the run is no longer running; a live progress bar when `show`."""
    deadline = time.monotonic() + timeout
    st = run(lambda: leader_status(c, run_id=run_id))
    record = _run_of(st, run_id) or {}
    first, target = record.get("first_round", 1), record.get("target_round", 0)
    progress = Progress(TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} rounds"), TimeElapsedColumn(),
                        console=err, disable=not show)
    with progress:
        bar = progress.add_task(run_id, total=max(0, target - first + 1))
        while True:
            try:
                st = leader_status(c, run_id=run_id)
            except (Unreachable, Refused):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
                continue
            record = _run_of(st, run_id) or {}
            p = st.get("progress")
            desc = run_id if not p else (f"{run_id} round {p['round']}.{p['attempt']} "
                                         f"{p['stage']}: {len(p['submitted'])}/"
                                         f"{len(p['participants'])} updates")
            progress.update(bar, completed=max(0, st["last_round"] - first + 1), description=desc)
            if record.get("status", "running") != "running" or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    return st


EVALUATION_WAIT_S = 60.0
"""How long `run start` waits, after the run ends, for the sites' report on its final model."""


def await_evaluation(c: AdminClient, run_id: str, st: dict[str, Any],
                     seconds: float) -> dict[str, Any]:
    """The status once the ended run's final model is evaluated (or `seconds` passed);
    a run that committed no round of its own has nothing to evaluate."""
    deadline = time.monotonic() + seconds
    while True:
        record = _run_of(st, run_id) or {}
        rows = round_rows(st, record) if record else []
        if (record.get("status", "running") == "running" or record.get("evaluation")
                or not any(r["status"] == "committed" for r in rows)
                or time.monotonic() > deadline):
            return st
        time.sleep(0.5)
        try:
            st = leader_status(c, run_id=run_id)
        except (Unreachable, Refused):
            continue


def round_rows(st: dict[str, Any], record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per round of the run: its outcome, attempts, survivors and metrics."""
    rows = []
    last = min(record["target_round"], st["last_round"] + 1)
    for rnd in range(record["first_round"], last + 1):
        h = st["history"].get(str(rnd))
        if h is None:
            continue
        c = h["committed"]
        row: dict[str, Any] = {"round": rnd, "status": "committed" if c else "not committed",
                               "attempts": (c["attempt"] if c else len(h["aborted"])),
                               "aborts": [a["reason"] for a in h["aborted"]]}
        if c:
            row.update(version=c["version"], leader=c.get("leader"),
                       participants=c["participants"], survivors=c["survivors"],
                       metrics=c["metrics"], site_metrics=c.get("site_metrics", {}))
        rows.append(row)
    return rows


def run_summary(st: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The run as `--json` prints it: its record, per-round rows and the final model."""
    rows = round_rows(st, record)
    committed = [r for r in rows if r["status"] == "committed"]
    last = committed[-1] if committed else None
    return {**record, "rounds_committed": len(committed), "round_rows": rows,
            "final_evaluation": record.get("evaluation"),
            "last_round": st["last_round"], "versions": [v["hash"] for v in st["versions"]],
            "final_version": last["version"] if last else record.get("base"),
            "final_site_metrics": last["site_metrics"] if last else {},
            "final_metrics": last["metrics"] if last else {}}


def _num(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def print_run(summary: dict[str, Any]) -> None:
    """The run's rounds, then what the sites report of the newest model they received."""
    t = Table("round", "status", "tries", "survivors", "base acc", "train loss", "s", "version",
              title=escape(f"run {summary['id']} ({summary['status']}): {summary.get('task') or '-'}"),
              expand=False)
    for r in summary["round_rows"]:
        m = r.get("metrics", {})
        t.add_row(str(r["round"]), r["status"], str(r["attempts"]),
                  f"{len(r.get('survivors', []))}/{len(r.get('participants', []))}",
                  _num(m, "base_accuracy"), _num(m, "train_loss"), _num(m, "seconds"),
                  (r.get("version") or "-")[:12])
    console.print(t)
    evaluation = summary.get("final_evaluation")
    if evaluation:
        e = Table("site", "eval accuracy", "eval loss",
                  title=f"final model {evaluation['version'][:12]}, as each site evaluated it")
        for site, m in sorted(evaluation["site_metrics"].items()):
            e.add_row(escape(site), _num(m, "eval_accuracy"), _num(m, "eval_loss"))
        e.add_row("mean", _num(evaluation["metrics"], "eval_accuracy"),
                  _num(evaluation["metrics"], "eval_loss"), style="bold")
        console.print(e)
    elif summary["final_site_metrics"]:
        s = Table("site", "eval accuracy", "eval loss", "train loss",
                  title="per site, as each reported the model it received in the last round")
        for site, m in sorted(summary["final_site_metrics"].items()):
            s.add_row(escape(site), _num(m, "eval_accuracy"), _num(m, "eval_loss"),
                      _num(m, "train_loss"))
        console.print(s)
    console.print(f"final model {summary['final_version']} after "
                  f"{summary['rounds_committed']} of {summary['rounds']} rounds")


def stopped_by(stopped: dict[str, Any]) -> str:
    """`by WHO: REASON` of a stopped run (an operator's stop, or the leader's)."""
    who = stopped.get("operator") or stopped.get("node") or "?"
    return f"by {escape(who)}: {escape(stopped['reason'])}"


def start_run(c: AdminClient, rounds: int, cfg: dict[str, Any], *, name: str | None,
              task: str | None, model: Path | None, wait: bool, timeout: float,
              as_json: bool) -> None:
    """Start a run (uploading its fresh model first), then follow it to its end."""
    if model is not None:
        try:
            data = model.read_bytes()
        except OSError as exc:
            err.print(f"[red]cannot read the model file[/] {model}: {escape(str(exc.strerror or exc))}")
            raise typer.Exit(EXIT_USAGE) from None
        run(lambda: c.call("InitModel", {"data": data, "fresh": True}))
    message: dict[str, Any] = {"rounds": rounds, "config": cfg}
    message.update({k: v for k, v in (("run", name), ("task", task)) if v is not None})
    r = run(lambda: c.call("Train", message))
    if not wait:
        emit(r) if as_json else console.print(
            f"run {r['run']} started: rounds {r['first_round']}-{r['target_round']}")
        return
    st = follow_run(c, r["run"], timeout, show=not as_json)
    st = await_evaluation(c, r["run"], st, EVALUATION_WAIT_S)
    st = run(lambda: run_status(c, r["run"]))
    record = _run_of(st, r["run"])
    if record is None:  # a node from before runs: nothing more to say
        raise typer.Exit(EXIT_TIMEOUT)
    summary = run_summary(st, record)
    emit(summary) if as_json else print_run(summary)
    if record["status"] == "stopped":
        err.print(f"[red]the run stopped at round {st['last_round']} of "
                  f"{record['target_round']}[/] ({stopped_by(record['stopped'])})")
        raise typer.Exit(EXIT_REFUSED)
    if record["status"] == "running":
        raise typer.Exit(EXIT_TIMEOUT)


@run_app.command("start")
def run_start(
    rounds: RoundsOpt = 1,
    name: Annotated[str | None, typer.Option("--name", help="the run's id (default run-N)")] = None,
    task: Annotated[str | None, typer.Option(help="what the run trains, a label for the log")] = None,
    model: Annotated[Path | None, typer.Option(
        help="start from this fresh model (safetensors) instead of the newest version")] = None,
    clients: ClientsOpt = None, fraction: FractionOpt = None, min_clients: MinClientsOpt = None,
    local_epochs: EpochsOpt = None, lr: LrOpt = None, batch_size: BatchOpt = None,
    collect_timeout: CollectOpt = None, settings: SetOpt = None, wait: WaitOpt = True,
    timeout: TimeoutOpt = 3600, config: ConfigOpt = None, admin: AdminOpt = None,
    ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Start a run of N rounds and follow it; ends with each round, the final model and
    what each site reported. Exit 1 if the run was stopped, 4 if following timed out."""
    c = operator_client(config, admin, ca, cert, key)
    cfg = round_config(clients, fraction, min_clients, local_epochs, lr, batch_size,
                       collect_timeout, settings)
    start_run(c, rounds, cfg, name=name, task=task, model=model, wait=wait, timeout=timeout,
              as_json=as_json)


@run_app.command("list")
def run_list(config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None,
             cert: CertOpt = None, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Every run of the federation, oldest first."""
    c = operator_client(config, admin, ca, cert, key)
    st = run(lambda: leader_status(c))
    runs = [run_summary(st, r) for r in st.get("runs", [])]
    if as_json:
        emit({"runs": [{k: v for k, v in r.items() if k != "round_rows"} for r in runs]})
        return
    t = Table("run", "status", "task", "rounds", "committed", "operator", "started", "final model")
    for r in runs:
        t.add_row(escape(r["id"]), r["status"], escape(r.get("task") or "-"),
                  f"{r['first_round']}-{r['target_round']}", str(r["rounds_committed"]),
                  escape(r.get("operator") or "-"), r.get("started_at") or "-",
                  (r["final_version"] or "-")[:12])
    console.print(t)
    if not runs:
        console.print("no runs yet (fedraft run start)")


@run_app.command("show")
def run_show(run_id: Annotated[str, typer.Argument(metavar="RUN", help="run id")],
             config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None,
             cert: CertOpt = None, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """One run: its configuration, each round, the final model and per-site metrics."""
    c = operator_client(config, admin, ca, cert, key)
    st = run(lambda: run_status(c, run_id))
    record = _run_of(st, run_id)
    if record is None:
        known = ", ".join(r["id"] for r in st.get("runs", [])) or "none"
        err.print(f"[red]no run {escape(run_id)!r}[/] (runs: {escape(known)})")
        raise typer.Exit(EXIT_REFUSED)
    summary = run_summary(st, record)
    if as_json:
        emit(summary)
        return
    print_run(summary)
    if record.get("stopped"):
        console.print(f"stopped {stopped_by(record['stopped'])}")
    console.print("config: " + " ".join(f"{k}={v}" for k, v in sorted(record["config"].items())))


def stop_run(c: AdminClient, run_id: str | None, reason: str | None, as_json: bool) -> None:
    message = {k: v for k, v in (("run", run_id), ("reason", reason)) if v is not None}
    r = run(lambda: c.call("Stop", message))
    if as_json:
        emit(r)
    else:
        console.print(f"run {r.get('run') or '-'} stopped: no round after {r['target_round']}; "
                      "the open attempt, if any, is aborted")


@run_app.command("stop")
def run_stop(
    run_id: Annotated[str | None, typer.Argument(metavar="[RUN]",
                                                 help="the run to stop (default: the running one)")] = None,
    reason: Annotated[str | None, typer.Option(help="why, for the audit log")] = None,
    config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None, cert: CertOpt = None,
    key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Stop the running run: its open attempt is aborted and no further round starts.
    Recorded in the audit log with your certificate's name and the reason."""
    stop_run(operator_client(config, admin, ca, cert, key), run_id, reason, as_json)
