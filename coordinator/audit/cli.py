"""``fedraft audit``: the auditor's commands (mounted by the main CLI as a Typer sub-app).

Every command reads either a live database (``--db URL`` or ``FEDRAFT_AUDIT_DB``), opened
read-only and never migrated, or an export (``--bundle DIR``). Tables for people, ``--json``
for scripts. The read commands (rounds, show, model) verify the whole log before they
show any of it, and show nothing of a log that fails (``--no-verify`` shows it, marked
unverified). Exit codes: 0 success; 1 the log fails verification, or the round / version
asked for is not in the log; 2 usage errors and unreachable or non-audit databases; 3 (verify
only) the log is self-consistent but nothing pinned its signer (no --key, no --head).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from coordinator.audit.bundle import Bundle, BundleError, export_bundle
from coordinator.audit.charges import Accountant, prv_epsilon
from coordinator.audit.entry import MODEL_KINDS, Checkpoint, Entry, PayloadError
from coordinator.audit.keys import AuditKeyError, load_public_key
from coordinator.audit.query import LineageError, RoundView
from coordinator.audit.report import build_report
from coordinator.audit.store import AuditError, AuditStore, open_readonly
from coordinator.audit.verify import VerifyReport

ENV_DB = "FEDRAFT_AUDIT_DB"
ENV_KEY = "FEDRAFT_AUDIT_PUBKEY"
EXIT_OK, EXIT_BAD, EXIT_USAGE, EXIT_UNPINNED = 0, 1, 2, 3

audit_app = typer.Typer(
    name="audit",
    help="Inspect, verify and export the tamper-evident audit log.",
    no_args_is_help=True,
    add_completion=False,
)

DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        help=f"Database URL, e.g. sqlite:///node1-audit.db or postgresql+psycopg://... "
        f"(or env {ENV_DB})",
        show_default=False,
    ),
]
BundleOpt = Annotated[
    Path | None,
    typer.Option("--bundle", help="Read an export directory instead of a database.",
                 file_okay=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key",
        envvar=ENV_KEY,
        help="Pin the genesis audit public key (64 hex digits, or a file with hex/PEM).",
    ),
]


VerifyReadOpt = Annotated[
    bool,
    typer.Option("--verify/--no-verify",
                 help="Verify the log's hashes and signatures before showing it (default); "
                 "--no-verify shows it unverified, and says so."),
]


def _pinned(key: str | None) -> dict[str, Any]:
    """The verify option that pins the genesis signer (`--key`), if one was given; a key
    that cannot be read is a usage error."""
    try:
        return {"genesis_key": load_public_key(key)} if key else {}
    except (AuditKeyError, OSError) as exc:
        _fail(EXIT_USAGE, f"unusable --key: {exc}")


def _checked(source: AuditStore | Bundle, key: str | None, verify: bool) -> None:
    """Verify the whole log before any of it is shown: a failure is named and nothing is
    shown (exit 1); unpinned or unverified output says so on stderr."""
    note = Console(stderr=True, highlight=False, soft_wrap=True)
    if not verify:
        note.print("[yellow]not verified[/] (--no-verify): what follows may have been edited")
        return
    try:
        options = _pinned(key)
    except typer.Exit:
        _close(source)
        raise
    report: VerifyReport = _read(source, lambda: source.verify(**options))
    if not report.ok:
        _close(source)
        where = (f"seq {report.first_bad_seq}" if report.first_bad_seq is not None
                 else f"the checkpoint at tree size {report.bad_checkpoint}")
        _fail(EXIT_BAD, f"the log FAILS verification at {where}: {report.reason}; nothing is "
                        "shown (fedraft audit verify names every issue; --no-verify shows it "
                        "anyway)")
    if not report.signer_pinned:
        note.print("[yellow]self-consistent, signer not pinned[/]: give --key (or "
                   f"{ENV_KEY}) to check who signed it")


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _fail(code: int, message: str) -> NoReturn:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def _open(db: str | None, bundle: Path | None) -> AuditStore | Bundle:
    """The log to read: --bundle wins over a database URL taken from the environment."""
    if db is not None and bundle is not None:
        _fail(EXIT_USAGE, "give either --db or --bundle, not both")
    if bundle is not None:
        try:
            return Bundle(bundle)
        except BundleError as exc:
            _fail(EXIT_USAGE, str(exc))
    url = db or os.environ.get(ENV_DB)
    if not url:
        _fail(EXIT_USAGE, f"no audit log given: use --db URL, {ENV_DB}, or --bundle DIR")
    scheme = url.partition(":")[0].partition("+")[0]
    if scheme not in ("sqlite", "postgresql"):
        what = (f"unsupported database URL {url.partition(':')[0]}:..." if ":" in url
                else f"{url!r} is not a database URL")
        _fail(EXIT_USAGE, f"{what}: the audit log is in SQLite (sqlite:///path) or "
                          "PostgreSQL (postgresql+psycopg://...)")
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///").split("?", 1)[0]
        if path and path != ":memory:" and not Path(path).exists():
            _fail(EXIT_USAGE, f"no database file {path}")
    try:
        return open_readonly(url)
    except (AuditError, SQLAlchemyError, ArgumentError, ValueError) as exc:
        _fail(EXIT_USAGE, f"cannot open the audit database: {_short(exc)}")


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _close(source: AuditStore | Bundle) -> None:
    if isinstance(source, AuditStore):
        source.close()


def _read(source: AuditStore | Bundle, fn: Any, *args: Any) -> Any:
    """Run a query, turning a database that drops away into exit code 2."""
    try:
        return fn(*args)
    except SQLAlchemyError as exc:
        _fail(EXIT_USAGE, f"database error: {_short(exc)}")
    except BundleError as exc:
        _fail(EXIT_USAGE, str(exc))


def _emit_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=None, sort_keys=True, default=str))


def _metrics_text(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in sorted(metrics.items()))


def _short_hash(value: str | None, n: int = 12) -> str:
    return value[:n] if value else "-"


@audit_app.command("rounds")
def rounds_cmd(
    since: Annotated[int | None, typer.Option(help="First round to list.")] = None,
    until: Annotated[int | None, typer.Option(help="Last round to list.")] = None,
    site: Annotated[str | None, typer.Option(help="Only rounds this site took part in.")] = None,
    db: DbOpt = None,
    bundle: BundleOpt = None,
    key: KeyOpt = None,
    verify: VerifyReadOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """List rounds: outcome, participants, model version, metrics, privacy spent.
    The log is verified first; exit 1 (nothing shown) when it fails."""
    source = _open(db, bundle)
    _checked(source, key, verify)
    try:
        views: list[RoundView] = _read(source, source.rounds, since, until, site)
    finally:
        _close(source)
    if as_json:
        _emit_json([v.summary() for v in views])
        return
    table = Table(title=escape(f"rounds in {source.describe()}"))
    table.add_column("round", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("tries", justify="right")
    table.add_column("sites", justify="right")
    table.add_column("kept", justify="right")
    table.add_column("version", no_wrap=True)
    table.add_column("ε spent", justify="right", no_wrap=True)
    table.add_column("metrics")
    for v in views:
        f = v.final
        style = {"committed": "green", "aborted": "red"}.get(v.status, "yellow")
        table.add_row(
            str(v.round), f"[{style}]{v.status}[/]", str(len(v.attempts)),
            str(len(f.participants)), str(len(f.survivors)) if f.survivors else "-",
            escape(_short_hash(f.version)), f"{v.epsilon_spent:.4g}",
            Text(_metrics_text(f.metrics)),
        )
    _out().print(table)
    if not views:
        _out().print("no rounds match")


@audit_app.command("show")
def show_cmd(
    round_number: Annotated[int, typer.Argument(metavar="ROUND", help="Round number.")],
    db: DbOpt = None,
    bundle: BundleOpt = None,
    key: KeyOpt = None,
    verify: VerifyReadOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Everything recorded about one round: each attempt, who took part, charges, model.
    The log is verified first; exit 1 (nothing shown) when it fails."""
    source = _open(db, bundle)
    _checked(source, key, verify)
    try:
        view: RoundView | None = _read(source, source.round, round_number)
    finally:
        _close(source)
    if view is None:
        _fail(EXIT_BAD, f"round {round_number} is not in the log")
    if as_json:
        _emit_json(view.to_dict())
        return
    out = _out()
    out.print(f"[bold]round {view.round}[/]: {view.status}, {len(view.attempts)} attempt(s)")
    for a in view.attempts:
        ended = ("" if a.ended_term in (None, a.term)
                 else f", {a.status} by the leader of term {a.ended_term}")
        table = Table(title=f"attempt {a.attempt} (opened in term {a.term}{ended}): {a.status}",
                      show_header=False, title_justify="left")
        table.add_column("field", style="bold")
        table.add_column("value")
        rows = [("entries (seq)", ", ".join(map(str, a.seqs))),
                ("run", a.run or "-"),
                ("opened / ended", f"{a.opened_at or '-'} / {a.ended_at or '-'}"),
                ("participants", ", ".join(a.participants) or "-")]
        if a.status == "committed":
            rows += [("survivors", ", ".join(a.survivors) or "-"),
                     ("base / parent", a.parent or a.base or "-"),
                     ("new version", f"{a.version} ({a.size} bytes)"),
                     ("metrics", _metrics_text(a.metrics) or "-")]
        else:
            rows.append(("base", a.base or "-"))
        if a.config_digest:
            rows.append(("config digest", a.config_digest))
        if a.config:
            rows.append(("config", " ".join(f"{k}={v}" for k, v in sorted(a.config.items()))))
        for site, m in sorted(a.site_metrics.items()):
            rows.append((f"{site} reported", _metrics_text(m)))
        if a.reason:
            rows.append(("abort reason", a.reason))
        for name, value in rows:
            table.add_row(name, Text(str(value)))
        out.print(table)
        if a.charges:
            charges = Table(title="privacy charges", title_justify="left")
            for col in ("site", "epsilon", "delta", "noise", "sample rate", "steps", "clip"):
                charges.add_column(col, justify="left" if col == "site" else "right")
            for s, c in sorted(a.charges.items()):
                charges.add_row(Text(s), *(Text(f"{c.get(k)}") for k in (
                    "epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "clip_norm")))
            out.print(charges)


@audit_app.command("model")
def model_cmd(
    version: Annotated[str, typer.Argument(
        help="Model version hash, a unique prefix, or 'latest' (the newest in the log).")],
    db: DbOpt = None,
    bundle: BundleOpt = None,
    key: KeyOpt = None,
    verify: VerifyReadOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Lineage of a model version back to its genesis model, one round per step.
    The log is verified first; exit 1 (nothing shown) when it fails."""
    source = _open(db, bundle)
    _checked(source, key, verify)
    try:
        if version == "latest":
            models = [e for e in _read(source, source.entries) if e.kind in MODEL_KINDS]
            if not models:
                raise LineageError("the log records no model version yet")
            version = models[-1].payload["version"]
        chain: list[Entry] = _read(source, source.lineage, version)
    except LineageError as exc:
        _fail(EXIT_BAD, str(exc))
    finally:
        _close(source)
    if as_json:
        _emit_json([e.to_dict() for e in chain])
        return
    table = Table(title=escape(f"lineage of {chain[0].payload.get('version')}"))
    for col in ("seq", "kind", "round", "version", "parent", "size", "sites"):
        table.add_column(col, no_wrap=True)
    table.add_column("metrics")
    for e in chain:
        p = e.payload
        cells = (str(e.seq), e.kind, str(p.get("round", "-")), _short_hash(p.get("version")),
                 _short_hash(p.get("parent")), str(p.get("size", "-")),
                 str(len(p.get("survivors", []))) if "survivors" in p else "-",
                 _metrics_text(p.get("metrics", {})))
        table.add_row(*(Text(c) for c in cells))
    _out().print(table)


def _load_accountant(spec: str) -> Accountant:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        _fail(EXIT_USAGE, "--accountant takes MODULE:FUNCTION")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        _fail(EXIT_USAGE, f"cannot load accountant {spec}: {exc}")
    if not callable(fn):
        _fail(EXIT_USAGE, f"{spec} is not callable")

    def epsilon(history: Sequence[Any], delta: float) -> float:
        return float(fn(history, delta))

    return epsilon


def _print_verify(report: VerifyReport, where: str) -> None:
    out = _out()
    where = escape(where)
    reason = escape(report.reason or "")
    c = report.counts
    if report.ok:
        label = "[bold green]OK[/]" if report.signer_pinned else "[bold yellow]UNPINNED[/]"
        out.print(
            f"{label} {where}: {c['entries']} entries, {c['signatures']} signatures, "
            f"{c['checkpoints']} checkpoints, {c['key_rotations']} key rotations, "
            f"{c['blobs']} blobs, {c['charges']} privacy charges verified"
            + (f" ({c['charges_unchecked']} not recomputed: --no-charges)"
               if c.get("charges_unchecked") else "")
        )
        if report.head_hash:
            out.print(f"head: seq {report.head_seq} {report.head_hash}")
    else:
        if report.first_bad_seq is not None:
            out.print(f"[bold red]FAILED[/] {where}: first bad entry is seq "
                      f"{report.first_bad_seq}: {reason}")
        else:
            out.print(f"[bold red]FAILED[/] {where}: checkpoint at tree size "
                      f"{report.bad_checkpoint}: {reason}")
        table = Table(title="issues")
        for col in ("seq", "check", "reason"):
            table.add_column(col)
        for issue in report.issues[:30]:
            where_ = str(issue.seq) if issue.seq is not None else f"cp {issue.checkpoint}"
            table.add_row(where_, issue.check, Text(issue.reason))
        out.print(table)
    for warning in report.warnings:
        out.print(f"[yellow]note:[/] {escape(warning)}")


@audit_app.command("verify")
def verify_cmd(
    blobs: Annotated[
        Path | None,
        typer.Option(help="Blob directory (files named by sha256): rehash every model version.",
                     file_okay=False),
    ] = None,
    key: KeyOpt = None,
    charges: Annotated[
        bool,
        typer.Option("--charges/--no-charges",
                     help="Recompute every recorded privacy charge over its site's history "
                     "in the log (imports the PRV accountant: seconds); --no-charges skips "
                     "it."),
    ] = True,
    accountant: Annotated[
        str | None,
        typer.Option(help="MODULE:FUNCTION taking (history of privacy.accounting.DPStep, "
                     "delta) to epsilon, instead of the leader's PRV accountant."),
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(help="Relative tolerance for recomputed epsilon (of the site's total); "
                     "use 1e-6 with other opacus/numpy/scipy versions than the cluster's."),
    ] = 1e-9,
    expect_size: Annotated[
        int | None,
        typer.Option(help="Entries the log had when you last saw it; fewer means truncation."),
    ] = None,
    head: Annotated[
        str | None,
        typer.Option(help="The cluster's signed audit head: a JSON file (or - for stdin) as "
                     "`fedraft cluster audit-head` writes it. Pins the signer and catches a "
                     "truncated tail."),
    ] = None,
    workers: Annotated[
        int, typer.Option(help="Processes for signature checks; 0 picks by log size and CPUs.",
                          min=0),
    ] = 0,
    db: DbOpt = None,
    bundle: BundleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify hashes, signatures, key rotations, checkpoints, privacy charges (and blobs).

    Exit 0 when the log verifies under a pinned signer, 1 when it does not (the first bad
    entry is named), 3 when it is only self-consistent (neither --key nor --head given).
    """
    if blobs is not None and not blobs.is_dir():
        _fail(EXIT_USAGE, f"no blob directory {blobs}")
    options: dict[str, Any] = {"charge_rel_tol": tolerance, "workers": workers, **_pinned(key)}
    if blobs is not None:
        options["blobs"] = blobs
    if accountant and not charges:
        _fail(EXIT_USAGE, "--accountant recomputes charges; it contradicts --no-charges")
    if charges:
        options["accountant"] = _load_accountant(accountant) if accountant else prv_epsilon
    if expect_size is not None:
        options["expected_size"] = expect_size
    if head is not None:
        options["trusted_head"] = _load_head(head)
    source = _open(db, bundle)
    try:
        report: VerifyReport = _read(source, lambda: source.verify(**options))
    finally:
        _close(source)
    if as_json:
        _emit_json(report.to_dict())
    else:
        _print_verify(report, source.describe())
    if not report.ok:
        raise typer.Exit(EXIT_BAD)
    raise typer.Exit(EXIT_OK if report.signer_pinned else EXIT_UNPINNED)


def _load_head(spec: str) -> Checkpoint:
    """A signed head from a file or stdin: the checkpoint itself, or an object holding it
    under `audit_head` (what `fedraft cluster audit-head --json` and `cluster status
    --json` print)."""
    try:
        text = typer.get_text_stream("stdin").read() if spec == "-" else Path(spec).read_text()
        data = json.loads(text)
        if isinstance(data, dict) and "audit_head" in data:
            data = data["audit_head"]
        if data is None:
            _fail(EXIT_USAGE, f"{spec} holds no audit head (the cluster has not committed one)")
        return Checkpoint.from_dict(data)
    except (OSError, UnicodeDecodeError, ValueError, PayloadError) as exc:
        _fail(EXIT_USAGE, f"unusable --head {spec}: {_short(exc)}")


@audit_app.command("export")
def export_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write.",
                                         file_okay=False)],
    db: DbOpt = None,
    bundle: BundleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write entries, checkpoints, keys and a manifest for offline verification."""
    source = _open(db, bundle)
    try:
        if isinstance(source, AuditStore):
            manifest = _read(source, source.export, output)
        else:
            manifest = _read(source, lambda: export_bundle(
                source.entries(), source.checkpoints(), output, source=source.describe()))
    except OSError as exc:
        _fail(EXIT_USAGE, f"cannot write {output}: {exc}")
    finally:
        _close(source)
    if as_json:
        _emit_json(manifest)
        return
    head = manifest.get("head") or {}
    _out().print(escape(
        f"exported {manifest['entries']} entries and {manifest['checkpoints']} checkpoints to "
        f"{output} (head seq {head.get('seq', '-')}); verify offline with "
        f"`fedraft audit verify --bundle {output}`"
    ))


@audit_app.command("report")
def report_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="HTML file to write.",
                                         dir_okay=False)],
    key: KeyOpt = None,
    db: DbOpt = None,
    bundle: BundleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Self-contained HTML report: verification, rounds, accuracy and epsilon charts.
    Exit 1 when the log fails verification (the report says so too), 3 when it verifies
    but nothing pinned its signer (no --key)."""
    options = _pinned(key)
    source = _open(db, bundle)
    try:
        report = _read(source, lambda: source.verify(**options))
        document = _read(source, build_report, source, report)
    finally:
        _close(source)
    try:
        output.write_text(document, encoding="utf-8")
    except OSError as exc:
        _fail(EXIT_USAGE, f"cannot write {output}: {exc}")
    if as_json:
        _emit_json({"output": str(output), "bytes": len(document), "verified": report.ok,
                    "signer_pinned": report.genesis_pinned, "first_bad_seq": report.first_bad_seq,
                    "reason": report.reason})
    else:
        status = "[green]verifies[/]" if report.ok else "[red]FAILS verification[/]"
        _out().print(f"wrote {escape(str(output))} ({len(document) // 1024} KiB); the log "
                     f"{status}")
    if not report.ok:
        raise typer.Exit(EXIT_BAD)
    if not report.genesis_pinned:
        raise typer.Exit(EXIT_UNPINNED)


@audit_app.command("serve")
def serve_cmd(
    ca: Annotated[Path, typer.Option(help="Federation CA (PEM); client certificates must be "
                                     "signed by it.", dir_okay=False)],
    cert: Annotated[Path, typer.Option(help="Certificate the console presents, e.g. the "
                                       "auditor's own.", dir_okay=False)],
    key_file: Annotated[Path | None, typer.Option(help="Its key (default: --cert with .key).",
                                                  dir_okay=False)] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one).", min=0, max=65535)] = 7400,
    key: KeyOpt = None,
    head: Annotated[str | None, typer.Option(help="Signed audit head JSON (or -) pinning the "
                                             "signer, as for verify.")] = None,
    charges: Annotated[bool, typer.Option(help="Recompute privacy charges (slow).")] = False,
    recheck: Annotated[float, typer.Option(help="Re-verify a log that did not grow after this "
                                           "many seconds (0: every request).", min=0)] = 10.0,
    db: DbOpt = None,
    bundle: BundleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Read-only web console over the log for auditor certificates (mutual TLS), until
    interrupted; --json prints one line with its URL once it listens."""
    from coordinator.audit.console.launch import LaunchError, launch

    genesis_key = _pinned(key).get("genesis_key")
    trusted = _load_head(head) if head is not None else None
    source = _open(db, bundle)

    def ready(info: dict[str, Any]) -> None:
        if as_json:
            return _emit_json(info)
        _out().print(escape(f"console for {info['source']} at {info['url']} (log: "
                            f"{info['status']}); Ctrl+C stops it"))

    try:
        launch(source, genesis_key=genesis_key, head=trusted, charges=charges, recheck=recheck,
               tls=(ca, cert, key_file), address=(host, port), on_ready=ready)
    except LaunchError as exc:
        _fail(EXIT_USAGE, str(exc))
    finally:
        _close(source)


if __name__ == "__main__":  # pragma: no cover
    audit_app()
