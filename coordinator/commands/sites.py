"""`fedraft client`: enroll, list and revoke client sites; set their budgets."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

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
from coordinator.ops.admin_client import MAX_SITES_PAGE, AdminClient

client_app = typer.Typer(help="Enroll, list and revoke client sites; set their budgets.",
                         no_args_is_help=True)


def _read_key(public_key: str) -> str:
    p = Path(public_key)
    text = p.read_text().strip() if p.exists() else public_key.strip()
    if text.startswith("-----BEGIN"):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        k = serialization.load_pem_public_key(text.encode())
        if not isinstance(k, Ed25519PublicKey):
            raise typer.BadParameter("not an Ed25519 public key")
        return k.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    return text.lower()


BundleOpt = Annotated[Path | None, typer.Option(
    "--bundle", help="also write the site's enrollment bundle here (0600; needs --ca-dir)")]
CaDirOpt = Annotated[Path | None, typer.Option(
    "--ca-dir", envvar="FEDRAFT_CA_DIR", help="CA directory (ca.pem, ca.key) that issues the "
    "site's TLS certificate")]
FleetOpt = Annotated[str | None, typer.Option(
    "--fleet", envvar="FEDRAFT_FLEET", help="fleet host:port[,host:port] sites dial (default: "
    "the nodes' fleet addresses from cluster status)")]
CertDaysOpt = Annotated[int, typer.Option("--cert-days", min=1, help="TLS certificate validity")]


@client_app.command("enroll")
def client_enroll(
    site: Annotated[str, typer.Argument(help="site id, e.g. hospital-a")],
    public_key: Annotated[str, typer.Option(help="Ed25519 public key: hex or a PEM file "
                                            "(fedraft-client keygen prints it)")],
    epsilon: Annotated[float, typer.Option(help="the site's privacy budget epsilon")] = 8.0,
    delta: Annotated[float, typer.Option(help="the site's privacy budget delta")] = 1e-5,
    bundle: BundleOpt = None, ca_dir: CaDirOpt = None, fleet: FleetOpt = None,
    cert_days: CertDaysOpt = 365,
    config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None, cert: CertOpt = None,
    key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Enroll a site's identity key; only enrolled sites may take part in rounds.

    With --bundle, also issue the site's TLS certificate and write the one file the site
    imports (`fedraft-client import`); it is built before enrolling, so a bad CA dir or
    endpoint enrolls nothing.
    """
    c = operator_client(config, admin, ca, cert, key)
    pub = _read_key(public_key)
    made = None if bundle is None else _site_bundle(
        c, site, pub, bundle, ca_dir, fleet, epsilon, delta, cert_days)
    r = run(lambda: c.call("Enroll", {"site": site, "public_key": pub,
                                      "epsilon": epsilon, "delta": delta}))
    if bundle is not None and made is not None:
        r = r | _write_site_bundle(bundle, made)
    emit(r) if as_json else console.print(f"enrolled [bold]{site}[/]" + (
        f"; bundle {bundle} (CA sha256 {r['ca_sha256']})" if bundle is not None else ""))


def _site_bundle(c: AdminClient, site: str, public_key: str, path: Path, ca_dir: Path | None,
                 fleet: str | None, epsilon: float, delta: float, days: int) -> dict[str, Any]:
    """Build a site's bundle, or exit 2 naming what is wrong, before anything is enrolled."""
    from coordinator.ops import enroll as bundles

    try:
        if ca_dir is None:
            raise bundles.BundleError("--bundle needs --ca-dir (the CA that issues the site's "
                                      "TLS certificate)")
        bundles.check_bundle_target(path)
        bundles.check_ca_dir(ca_dir)
        nodes = (bundles.parse_endpoints(fleet) if fleet
                 else bundles.fleet_from_status(run(lambda: c.call("Status"))))
        return bundles.build_bundle(ca_dir, site, public_key, nodes, epsilon, delta, days)
    except bundles.BundleError as exc:
        err.print(f"[red]bundle:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_USAGE) from None


def _write_site_bundle(path: Path, made: dict[str, Any]) -> dict[str, Any]:
    from coordinator.ops import enroll as bundles

    try:
        bundles.write_bundle(path, made)
    except OSError as exc:
        err.print(f"[red]bundle not written:[/] {escape(str(exc))}; `fedraft client bundle {made['site']}` "
                  "makes a new one")
        raise typer.Exit(EXIT_USAGE) from None
    return {"bundle": str(path), "ca_sha256": bundles.ca_fingerprint(made["ca_pem"].encode()),
            "nodes": made["nodes"]}


@client_app.command("bundle")
def client_bundle(
    site: Annotated[str, typer.Argument(help="an enrolled, unrevoked site id")],
    bundle: Annotated[Path, typer.Option("--bundle", help="where to write it (0600, new file)")],
    ca_dir: CaDirOpt = None, fleet: FleetOpt = None, cert_days: CertDaysOpt = 365,
    config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None, cert: CertOpt = None,
    key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """A new bundle with a freshly issued TLS certificate for an enrolled site (rotation,
    or a lost bundle); the identity key and budget stay as enrolled."""
    c = operator_client(config, admin, ca, cert, key)
    rec = run(lambda: c.site(site))
    if rec is None or rec["revoked"]:
        err.print(f"[red]site {site!r} is {'revoked' if rec else 'not enrolled'}[/]")
        raise typer.Exit(EXIT_REFUSED)
    made = _site_bundle(c, site, rec["public_key"], bundle, ca_dir, fleet,
                        rec["budget"]["epsilon"], rec["budget"]["delta"], cert_days)
    out = {"site": site} | _write_site_bundle(bundle, made)
    emit(out) if as_json else console.print(
        f"bundle {bundle} for [bold]{site}[/] (CA sha256 {out['ca_sha256']})")


@client_app.command("budget")
def client_budget(
    site: Annotated[str, typer.Argument(help="an enrolled site id")],
    epsilon: Annotated[float, typer.Option(help="the site's new privacy budget epsilon (not "
                                           "below what it has spent)")],
    delta: Annotated[float | None, typer.Option(help="a new delta; only before the site's "
                                                "first charge (default: keep it)")] = None,
    config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None, cert: CertOpt = None,
    key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Change a site's privacy budget; the change is recorded in the audit log."""
    c = operator_client(config, admin, ca, cert, key)
    r = run(lambda: c.set_budget(site, epsilon, delta))
    if as_json:
        emit(r)
    elif not r.get("changed", True):
        console.print(f"budget of [bold]{site}[/] unchanged: epsilon {epsilon:g}, "
                      f"delta {r['budget']['delta']:g}")
    else:
        old, new = r["old_budget"], r["budget"]
        console.print(f"budget of [bold]{site}[/]: epsilon {old['epsilon']:g} -> "
                      f"{new['epsilon']:g}, delta {old['delta']:g} -> {new['delta']:g} "
                      f"(spent {r['spent']:.4g})")


@client_app.command("revoke")
def client_revoke(site: str, config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None,
                  cert: CertOpt = None, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Revoke a site: it is refused from now on and never sampled again."""
    c = operator_client(config, admin, ca, cert, key)
    r = run(lambda: c.call("Revoke", {"site": site}))
    emit(r) if as_json else console.print(f"revoked [bold]{site}[/]")


def _pages(c: AdminClient, endpoint: str | None, after: str | None, size: int, every: bool,
           filters: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The sites of one page (or, with `every`, of each page to the last) and the last page."""
    rows: list[dict[str, Any]] = []
    while True:
        page = run(functools.partial(c.sites, after, size, endpoint, **filters))
        rows += page["sites"]
        after = page["next"]
        if not every or after is None:
            return rows, page


LimitOpt = Annotated[int | None, typer.Option(
    "--limit", min=1, max=MAX_SITES_PAGE, help=f"sites per page (default 100; with --all "
    f"{MAX_SITES_PAGE})")]


@client_app.command("list")
def client_list(
    limit: LimitOpt = None,
    after: Annotated[str | None, typer.Option(
        help="list sites whose id sorts after this one (the `next` of the previous page)")] = None,
    every: Annotated[bool, typer.Option("--all", help="follow the pages to the last site")] = False,
    online: Annotated[bool, typer.Option("--online", help="only sites online now")] = False,
    revoked: Annotated[bool, typer.Option("--revoked", help="only revoked sites")] = False,
    config: ConfigOpt = None, admin: AdminOpt = None, ca: CaOpt = None,
    cert: CertOpt = None, key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Enrolled sites in id order, a page at a time: revoked, quarantined (found behind an
    invalid secure sum) or not, whether the leader saw them recently, and their charges."""
    if after is not None and not wire.SITE_ID.fullmatch(after):
        err.print(f"[red]bad --after:[/] {escape(repr(after))} is not a site id")
        raise typer.Exit(EXIT_USAGE)
    c = operator_client(config, admin, ca, cert, key)
    ep = run(c.leader_endpoint)
    filters = {"online": True if online else None, "revoked": True if revoked else None}
    rows, page = _pages(c, ep, after, limit or (MAX_SITES_PAGE if every else 100), every,
                        filters)
    if as_json:
        emit({"sites": rows, "total": page["total"], "enrolled": page["enrolled"],
              "next": page["next"]})
        return
    t = Table("site", "status", "online", "charges", "spent ε", "public key")
    for s in rows:
        status = ("[red]revoked[/]" if s["revoked"] else "[red]quarantined[/]"
                  if s.get("quarantined") else "enrolled")
        t.add_row(s["site"], status, "yes" if s["online"] else "no", str(s["charge_count"]),
                  f"{s['spent']:.3f}", s["public_key"][:16] + "…")
    console.print(t)
    more = f"; next page: --after {page['next']}" if page["next"] is not None else ""
    console.print(f"{len(rows)} of {page['total']} sites{more}")
