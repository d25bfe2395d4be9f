"""`fedraft privacy`: the replicated privacy ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from coordinator.commands.common import (
    EXIT_REFUSED,
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

privacy_app = typer.Typer(help="The replicated privacy ledger.", no_args_is_help=True)


@privacy_app.command("ledger")
def privacy_ledger(
    site: Annotated[str | None, typer.Option(help="only this site")] = None,
    plot: Annotated[Path | None, typer.Option(help="write a PNG of epsilon over rounds")] = None,
    config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None, cert: CertOpt = None,
    key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Spent and remaining epsilon per site, every charge (aborted attempts included)."""
    c = operator_client(config, admin, ca, cert, key)
    if site is not None:
        one = run(lambda: c.site(site))
        if one is None:
            err.print(f"[red]no site {site!r}[/]")
            raise typer.Exit(EXIT_REFUSED)
        sites = [one]
    else:  # every charge of every site only where they are printed or plotted
        sites = run(lambda: c.all_sites(charges=as_json or plot is not None))
    rows = [{"site": s["site"], "epsilon_budget": s["budget"]["epsilon"],
             "delta": s["budget"]["delta"], "epsilon_spent": s["spent"],
             "epsilon_remaining": max(0.0, s["budget"]["epsilon"] - s["spent"]),
             "charge_count": s["charge_count"], "charges": s.get("charges")} for s in sites]
    if plot is not None:
        _plot_ledger(rows, plot)
    if as_json:
        emit({"sites": rows})
        return
    t = Table("site", "budget ε", "δ", "spent ε", "remaining ε", "charges")
    for r in rows:
        t.add_row(r["site"], f"{r['epsilon_budget']:.3g}", f"{r['delta']:.0e}",
                  f"{r['epsilon_spent']:.3f}", f"{r['epsilon_remaining']:.3f}",
                  str(r["charge_count"]))
    console.print(t)
    if plot is not None:
        console.print(f"plot written to {plot}")


def _plot_ledger(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        xs = [c["round"] + (c["attempt"] - 1) * 0.1 for c in r["charges"]]
        ax.step([0, *xs], [0.0, *(c["epsilon_total"] for c in r["charges"])], where="post",
                label=r["site"])
    budgets = {r["epsilon_budget"] for r in rows}
    for b in budgets:
        ax.axhline(b, linestyle="--", color="grey", linewidth=1)
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent (PRV)")
    ax.set_title("privacy ledger")
    if rows:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
