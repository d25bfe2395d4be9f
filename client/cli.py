"""`fedraft-client`: the site agent's command line.

Exit codes: 0 done; 1 refused by the federation (unenrolled, revoked); 2 bad usage or
configuration.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from client.config import PrivacyConfig, SiteConfig, SiteConfigError, load_site_config  # noqa: E402

if TYPE_CHECKING:
    from client.training import LocalTrainer

# errors are reported by main() in one line: a rich trace would print local variables
app = typer.Typer(help="fedraft site agent: train locally, share only protected updates.",
                  pretty_exceptions_enable=False,
                  no_args_is_help=True)
console = Console()
err = Console(stderr=True, soft_wrap=True)  # an error is one line, however long
log = logging.getLogger(__name__)


def _trainer_from_config(cfg: SiteConfig) -> LocalTrainer:
    """The site's trainer: a built-in task or a hosted Flower app, inside record-level or
    client-level DP when site.toml gives the site a budget of its own ([privacy])."""
    if cfg.flower_app:
        from client.training.flower_host import FlowerAppError, FlowerAppTrainer

        # [data] is the app's node_config; its run_config comes from its pyproject.toml
        # and, each round, from the federation's settings (see flower_host)
        node_config = {"partition-id": cfg.data.get("partition", 0),
                       "num-partitions": cfg.data.get("num_partitions", 1)}
        try:
            hosted = FlowerAppTrainer(cfg.flower_app, node_config=node_config, app_dir=cfg.app_dir)
        except FlowerAppError as exc:
            raise SiteConfigError(f"task.flower_app: {exc}") from None
        if cfg.privacy is None:
            return hosted
        return _client_level_dp(cfg, cfg.privacy, hosted)
    from client.training.tasks import make_trainer

    d = cfg.data
    trainer = make_trainer(cfg.task, site_index=d.get("partition", 0),
                           num_sites=d.get("num_partitions", 1), method=d.get("split", "iid"),
                           alpha=d.get("alpha", 0.5), seed=d.get("seed", cfg.seed),
                           device=cfg.device)
    p = cfg.privacy
    if p is None:
        return trainer
    from client.dp.record_level import site_dp_sgd

    return site_dp_sgd(trainer, p, cfg.state_dir)


def _client_level_dp(cfg: SiteConfig, p: PrivacyConfig, hosted: LocalTrainer) -> LocalTrainer:
    from client.dp.client_level import ClientLevelDPTrainer

    # Same ledger file as DP-SGD: one site, one history, as on the replicated ledger.
    trainer = ClientLevelDPTrainer(hosted, epsilon=p.epsilon, delta=p.delta,
                                   planned_rounds=p.planned_rounds,
                                   state_path=cfg.state_dir / "dp-accountant.json",
                                   clip_norm=p.clip_norm)
    log.warning("privacy: site %s hosts a Flower app, so its DP guarantee is CLIENT-LEVEL "
                "(the whole update of each round clipped to L2 norm %g, Gaussian noise "
                "multiplier %.3f), not record-level: epsilon %g, delta %g over %d planned "
                "rounds (spent so far %.3f)", cfg.site_id, trainer.clip_norm,
                trainer.noise_multiplier, trainer.epsilon_budget, trainer.delta,
                p.planned_rounds, trainer.epsilon_spent)
    return trainer


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", envvar="FEDRAFT_SITE_CONFIG",
                                         help="site TOML")],
    max_rounds: Annotated[int | None, typer.Option(help="exit after this many rounds")] = None,
    log_level: Annotated[str, typer.Option()] = "info",
    as_json: Annotated[bool, typer.Option(
        "--json", help="one JSON object per round attempt on stdout (logs stay on stderr)")] = False,
) -> None:
    """Join the federation and serve round tasks until stopped."""
    from client.agent import Agent
    from client.store import load_identity_key

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_site_config(config)
        key = load_identity_key(cfg.identity_key)
        tls = (cfg.ca.read_bytes(), cfg.cert.read_bytes(), cfg.key.read_bytes())
    except (SiteConfigError, OSError, ValueError) as exc:
        err.print(f"[red]configuration error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    from client.store import StateDirBusy, lock_state_dir
    from coordinator.wire import identity_problem

    problem = identity_problem(cfg.ca, cfg.cert, cfg.key, ("client",))
    if problem is not None:  # the nodes would refuse it: say why, do not retry forever
        err.print(f"[red]TLS identity error:[/] {escape(str(problem))}")
        raise typer.Exit(2)
    try:
        lock = lock_state_dir(cfg.state_dir)  # noqa: F841 (held while the agent runs)
    except StateDirBusy as exc:
        err.print(f"[red]refusing to start:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    privacy = cfg.privacy
    logging.getLogger("client").info(  # what it runs with; file paths only, never their contents
        "site %s starting: nodes %s, state %s, %s, data %s, device %s, threads %d, DP %s, "
        "certificate %s", cfg.site_id, ",".join(cfg.nodes), cfg.state_dir,
        f"flower app {cfg.flower_app}" if cfg.flower_app else f"task {cfg.task}",
        cfg.data or "default", cfg.device, cfg.threads,
        f"epsilon {privacy.epsilon} delta {privacy.delta}" if privacy else "off", cfg.cert)
    import torch

    # Small models train far faster on one CPU thread than on contended many.
    torch.set_num_threads(max(1, cfg.threads))
    try:
        trainer = _trainer_from_config(cfg)
    except (SiteConfigError, ValueError) as exc:
        err.print(f"[red]configuration error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None

    def report(outcome: Any) -> None:
        print(json.dumps({"site": cfg.site_id, **dataclasses.asdict(outcome)}), flush=True)

    agent = Agent(cfg.site_id, list(cfg.nodes), tls, key, trainer, cfg.state_dir,
                  poll_wait_s=cfg.poll_wait_s, on_round=report if as_json else None)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stopped.set())
    try:
        agent.run(max_rounds=max_rounds)
    except PermissionError as exc:
        err.print(f"[red]refused by the federation:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None


@app.command()
def keygen(out: Annotated[Path, typer.Option("--out", "-o", help="private key file (PEM)")],
           as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
           ) -> None:
    """Create the site's Ed25519 identity key; prints the public key to enroll."""
    from client.store import write_identity_key
    from coordinator.wire import public_key_hex

    try:
        key = write_identity_key(out)
    except FileExistsError:
        err.print(f"[red]{out} exists; refusing to overwrite an identity key[/]")
        raise typer.Exit(2) from None
    except OSError as exc:
        err.print(f"[red]cannot write {out}: {escape(str(exc.strerror or exc))}[/]")
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps({"public_key": public_key_hex(key), "identity_key": str(out)}))
    else:
        print(public_key_hex(key))


@app.command("import")
def import_(
    bundle: Annotated[Path, typer.Argument(help="bundle from `fedraft client enroll --bundle`")],
    identity_key: Annotated[Path, typer.Option(
        "--identity-key", help="this site's identity key (fedraft-client keygen); must be the "
        "enrolled one")],
    directory: Annotated[Path, typer.Option("--dir", help="site directory to write")] = Path("."),
    task: Annotated[str | None, typer.Option(help="built-in task name, e.g. breast_cancer")] = None,
    flower_app: Annotated[str | None, typer.Option(
        help="a Flower app: its `flwr new` project directory, or module:attribute of its ClientApp")] = None,
    app_dir: Annotated[str | None, typer.Option(
        help="with --flower-app module:attribute: the directory holding its package")] = None,
    partition: Annotated[int, typer.Option(
        help="this site's data shard (a Flower app's node_config partition-id)")] = 0,
    num_partitions: Annotated[int, typer.Option(
        help="number of shards (a Flower app's node_config num-partitions)")] = 1,
    ca_sha256: Annotated[str | None, typer.Option(
        help="refuse unless the bundle's CA has this sha256 (the operator prints it)")] = None,
    force: Annotated[bool, typer.Option(help="replace files from an earlier import (site.toml "
                                        "is kept as site.toml.bak)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Unpack an enrollment bundle into a site directory with a ready site.toml."""
    from client.enroll import BundleError, import_bundle

    try:
        if task is not None:
            from client.training.tasks import TASKS

            if task not in TASKS:
                raise BundleError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        done = import_bundle(bundle, identity_key, directory, task=task, flower_app=flower_app,
                             partition=partition, num_partitions=num_partitions,
                             ca_sha256=ca_sha256, force=force, app_dir=app_dir)
    except (BundleError, OSError) as exc:
        if as_json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        err.print(f"[red]import refused:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    out = {"ok": True, "site": done.bundle.site, "config": str(done.config_path),
           "files": [str(f) for f in done.files], "nodes": list(done.bundle.nodes),
           "budget": done.bundle.budget, "ca_sha256": done.ca_sha256}
    if as_json:
        print(json.dumps(out))
    else:
        console.print(f"site [bold]{out['site']}[/] ready: fedraft-client run --config "
                      f"{out['config']}")


@app.command("init-model")
def init_model(
    out: Annotated[Path, typer.Option("--out", "-o")],
    task: Annotated[str | None, typer.Option(help="built-in task name")] = None,
    flower_app: Annotated[str | None, typer.Option(
        help="a Flower app's `flwr new` project directory (its ServerApp's initial arrays), or "
             "module:attribute of a ClientApp answering @app.query('initial_parameters')")] = None,
    app_dir: Annotated[str | None, typer.Option(
        help="with --flower-app module:attribute: the directory holding its package")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Write fresh version-0 weights (a built-in task's, or a Flower app's) as safetensors."""
    from coordinator.wire import encode_model, sha256_hex

    if (task is None) == (flower_app is None):
        err.print("[red]give exactly one of --task and --flower-app[/]")
        raise typer.Exit(2)
    if app_dir is not None and flower_app is None:
        err.print("[red]--app-dir goes with --flower-app[/]")
        raise typer.Exit(2)
    if flower_app is not None:
        from client.training.flower_host import FlowerAppError, FlowerAppTrainer

        try:
            params = FlowerAppTrainer(flower_app, app_dir=app_dir, seed=seed).initial_parameters()
        except FlowerAppError as exc:
            err.print(f"[red]cannot use the Flower app:[/] {escape(str(exc))}")
            raise typer.Exit(2) from None
    else:
        from client.training.tasks import TASKS, build_model, get_parameters

        if task not in TASKS:
            err.print(f"[red]unknown task {task!r}; choose one of {', '.join(TASKS)}[/]")
            raise typer.Exit(2)
        params = get_parameters(build_model(task, seed))
    data = encode_model(params)
    try:
        out.write_bytes(data)
    except OSError as exc:
        err.print(f"[red]cannot write {out}: {escape(str(exc.strerror or exc))}[/]")
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps({"hash": sha256_hex(data), "out": str(out), "bytes": len(data)}))
    else:
        print(sha256_hex(data))


@app.command()
def evaluate(
    task: Annotated[str, typer.Option(help="built-in task name")],
    models: Annotated[list[Path], typer.Argument(help="safetensors files")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Accuracy of model files on the task's global held-out test split (simulations)."""
    from client.training.tasks import evaluate_global
    from coordinator.wire import decode_model

    acc = [evaluate_global(task, decode_model(p.read_bytes())) for p in models]
    if as_json:
        print(json.dumps({"accuracy": acc}))
    else:
        for p, a in zip(models, acc, strict=True):
            console.print(f"{p}: {a:.4f}")


def main() -> None:
    import faulthandler
    import signal as _signal

    faulthandler.register(_signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack
    from coordinator.lifeline import bind_to_parent

    bind_to_parent()
    if not sys.stdout.isatty():  # piped or captured: tables are not cut at 80 columns
        os.environ.setdefault("COLUMNS", "200")
    try:
        app()
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:  # a failure no command turned into its own message
        sys.exit(_crash_exit(exc))


def _crash_exit(exc: Exception) -> int:
    """One line, never a trace with local variables: they hold the site's TLS and identity
    keys. FEDRAFT_DEBUG=1 prints the trace too, without locals."""
    if os.environ.get("FEDRAFT_DEBUG"):
        traceback.print_exception(exc)
    print(f"fedraft-client: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, OSError) else 1
