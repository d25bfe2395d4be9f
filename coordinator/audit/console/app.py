"""The console's pages and their JSON twins: a Starlette app with Jinja2 templates, GET only.

Each page has an ``/api/...`` endpoint whose body is byte-for-byte what the matching
``fedraft audit ... --json`` command prints (same views, same ``json.dumps`` settings), so a
script or a test can hold the two side by side. The verification verdict travels in the
``X-Fedraft-Verification`` header there, and as the banner on every page.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from coordinator.audit.canonical import canonical_text
from coordinator.audit.console.data import (
    READ_ERRORS,
    ConsoleSource,
    Verification,
    Verifier,
    all_entries,
    latest_version,
    runs_of,
    spend_dict,
    spend_rows,
)
from coordinator.audit.console.server import AUDITOR, ASGIApp, Receive, RequireRole, Scope, Send
from coordinator.audit.query import LineageError, SpendSeries
from coordinator.audit.report import PALETTE, Series, build_report, epsilon_chart, line_chart

TEMPLATES = Path(__file__).parent / "templates"
STATUS_HEADER = "X-Fedraft-Verification"
NAV = (("/", "overview", ""), ("/runs", "runs", "runs"), ("/rounds", "rounds", "rounds"),
       ("/model/latest", "lineage", "model"), ("/privacy", "privacy", "privacy"),
       ("/exports", "exports", "exports"))


class CliJSON(Response):
    """JSON encoded exactly as ``fedraft audit --json`` encodes it."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, indent=None, sort_keys=True, default=str).encode("utf-8")


class GetOnly:
    """ASGI middleware: the console has no write path, so every method but GET/HEAD is 405."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD"):
            response = PlainTextResponse("read-only console: only GET is allowed\n",
                                         status_code=405, headers={"Allow": "GET, HEAD"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _fmt_eps(value: Any) -> str:
    return "-" if value is None else f"{float(value):.6g}"


def _short(value: Any, n: int = 12) -> str:
    return str(value)[:n] if value else "-"


def _metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in sorted(metrics.items()))


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(eps=_fmt_eps, short=_short, metrics=_metrics)
    return env


def _int_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise HTTPException(400, f"{name} must be a whole number, not {raw!r}") from None


class Console:
    """The request handlers, over one source and its verifier."""

    def __init__(self, source: ConsoleSource, verifier: Verifier) -> None:
        self.source = source
        self.verifier = verifier
        self.templates = Jinja2Templates(env=_environment())

    # --- helpers ---------------------------------------------------------------------------

    def page(self, request: Request, name: str, api: str | None, status_code: int = 200,
             verdict: Verification | None = None, **context: Any) -> Response:
        """Render a page with the verification banner on it."""
        verdict = verdict or self.verifier.current()
        state = request.scope.get("state") or {}
        context.update(banner=verdict.banner(), verdict=verdict, source=self.source.describe(),
                       peer=state.get("peer"), nav=NAV, api=api,
                       section=request.url.path.strip("/").split("/")[0])
        response = self.templates.TemplateResponse(request, name, context,
                                                   status_code=status_code)
        response.headers[STATUS_HEADER] = verdict.status
        return response

    def api(self, value: Any, status_code: int = 200,
            verdict: Verification | None = None) -> Response:
        """A JSON body as the CLI prints it; the verdict in a header."""
        verdict = verdict or self.verifier.current()
        return CliJSON(value, status_code=status_code, headers={STATUS_HEADER: verdict.status})

    def verified(self) -> Verification:
        """The verdict, or 409 when the log fails it: its contents are not shown then."""
        verdict = self.verifier.current()
        if verdict.withheld is not None:
            raise HTTPException(409, verdict.withheld)
        return verdict

    # --- overview and runs -----------------------------------------------------------------

    def _overview(self, verdict: Verification) -> dict[str, Any]:
        report = verdict.report
        head = {"source": self.source.describe(), "status": verdict.status,
                "banner": verdict.banner(), "error": verdict.error,
                "verification": report.to_dict() if report is not None else None}
        if verdict.withheld is not None:
            return {**head, "withheld": verdict.withheld}
        rounds = self.source.rounds()
        spend = self.source.spend()
        return {
            **head,
            "withheld": None,
            "rounds": {"total": len(rounds),
                       "committed": sum(1 for r in rounds if r.status == "committed"),
                       "aborted": sum(1 for r in rounds if r.status == "aborted"),
                       "retried_attempts": sum(len(r.attempts) - 1 for r in rounds)},
            "sites": len(spend),
            "sites_charged": sum(1 for s in spend.values() if s.cumulative),
            "latest_version": latest_version(self.source),
            "runs": len(runs_of(self.source)),
            "keys": [dataclasses.asdict(k) for k in self.source.keys()],
        }

    def overview(self, request: Request) -> Response:
        verdict = self.verifier.current()
        return self.page(request, "overview.html", "/api/overview", verdict=verdict,
                         title="overview", data=self._overview(verdict))

    def api_overview(self, request: Request) -> Response:
        verdict = self.verifier.current()
        return self.api(self._overview(verdict), verdict=verdict)

    def runs(self, request: Request) -> Response:
        verdict = self.verified()
        return self.page(request, "runs.html", "/api/runs", verdict=verdict, title="runs",
                         runs=runs_of(self.source))

    def api_runs(self, request: Request) -> Response:
        verdict = self.verified()
        return self.api(runs_of(self.source), verdict=verdict)

    # --- rounds ----------------------------------------------------------------------------

    def _rounds(self, request: Request) -> tuple[dict[str, Any], list[Any]]:
        query = {"since": _int_param(request, "since"), "until": _int_param(request, "until"),
                 "site": request.query_params.get("site") or None}
        return query, self.source.rounds(query["since"], query["until"], query["site"])

    def rounds(self, request: Request) -> Response:
        verdict = self.verified()
        query, views = self._rounds(request)
        api = "/api/rounds" + (f"?{request.url.query}" if request.url.query else "")
        return self.page(request, "rounds.html", api, verdict=verdict, title="rounds",
                         query=query, rounds=[v.summary() for v in views])

    def api_rounds(self, request: Request) -> Response:
        verdict = self.verified()
        return self.api([v.summary() for v in self._rounds(request)[1]], verdict=verdict)

    def _round(self, request: Request) -> Any:
        number = request.path_params["number"]
        view = self.source.round(number)
        if view is None:
            raise HTTPException(404, f"round {number} is not in the log")
        return view

    def round(self, request: Request) -> Response:
        verdict = self.verified()
        view = self._round(request)
        return self.page(request, "round.html", f"/api/rounds/{view.round}", verdict=verdict,
                         title=f"round {view.round}", view=view.to_dict())

    def api_round(self, request: Request) -> Response:
        verdict = self.verified()
        return self.api(self._round(request).to_dict(), verdict=verdict)

    # --- model lineage ---------------------------------------------------------------------

    def _lineage(self, request: Request) -> tuple[str, list[dict[str, Any]]]:
        asked = request.path_params["version"]
        version = latest_version(self.source) if asked == "latest" else asked
        if version is None:
            raise HTTPException(404, "the log holds no model version yet")
        try:
            chain = self.source.lineage(version)
        except LineageError as exc:
            raise HTTPException(404, str(exc)) from None
        return asked, [e.to_dict() for e in chain]

    def model(self, request: Request) -> Response:
        verdict = self.verified()
        asked, chain = self._lineage(request)
        return self.page(request, "model.html", f"/api/model/{asked}", verdict=verdict,
                         asked=asked, chain=chain,
                         title=f"lineage of {chain[0]['payload'].get('version', '?')[:16]}")

    def api_model(self, request: Request) -> Response:
        verdict = self.verified()
        return self.api(self._lineage(request)[1], verdict=verdict)

    def model_form(self, request: Request) -> Response:
        """``/model?version=...`` (the page's form) to ``/model/{version}``."""
        version = (request.query_params.get("version") or "latest").strip() or "latest"
        return RedirectResponse(request.url_for("model", version=version), status_code=303)

    # --- privacy ---------------------------------------------------------------------------

    def privacy(self, request: Request) -> Response:
        verdict = self.verified()
        spend = self.source.spend()
        chart, left_out = epsilon_chart(spend)
        return self.page(request, "privacy.html", "/api/privacy", verdict=verdict,
                         title="privacy", rows=spend_rows(spend), chart=Markup(chart),
                         left_out=left_out, site_charts=_site_charts(spend))

    def api_privacy(self, request: Request) -> Response:
        verdict = self.verified()
        spend = self.source.spend()
        return self.api({"sites": spend_rows(spend), "series": spend_dict(spend)},
                        verdict=verdict)

    # --- verification and exports ----------------------------------------------------------

    def api_verify(self, request: Request) -> Response:
        verdict = self.verifier.current()
        if verdict.report is None:
            return self.api({"error": verdict.error}, status_code=503, verdict=verdict)
        return self.api(verdict.report.to_dict(), verdict=verdict)

    def exports(self, request: Request) -> Response:
        return self.page(request, "exports.html", "/api/verify", title="exports")

    def export_entries(self, request: Request) -> Response:
        """The entries as the verdict covered them (up to its head), one canonical JSON a line.

        Entries appended after the verdict are left out until they are verified too.
        """
        verdict = self.verifier.current()
        head = verdict.report.head_seq if verdict.report is not None else None
        if head is None:
            raise HTTPException(503, "the log could not be verified; nothing to export")

        def lines() -> Iterator[str]:
            for e in all_entries(self.source):
                if e.seq > head:
                    return
                yield canonical_text(e.to_dict()) + "\n"

        name = "entries.jsonl" if verdict.status == "ok" else f"entries-{verdict.status}.jsonl"
        return StreamingResponse(lines(), media_type="application/x-ndjson", headers={
            "Content-Disposition": f'attachment; filename="{name}"', STATUS_HEADER: verdict.status})

    def export_report(self, request: Request) -> Response:
        verdict = self.verifier.current()
        document = build_report(self.source, verdict.report)
        return HTMLResponse(document, headers={
            "Content-Disposition": 'attachment; filename="audit-report.html"',
            STATUS_HEADER: verdict.status})

    # --- errors ----------------------------------------------------------------------------

    def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return self._error(request, exc.status_code, str(exc.detail))

    def read_error(self, request: Request, exc: Exception) -> Response:
        text = str(exc).strip().splitlines()
        return self._error(request, 503, f"the audit log cannot be read: "
                                         f"{text[0] if text else type(exc).__name__}")

    def _error(self, request: Request, status_code: int, message: str) -> Response:
        if request.url.path.startswith("/api/"):
            return self.api({"error": message}, status_code=status_code)
        return self.page(request, "error.html", None, status_code=status_code,
                         title=f"error {status_code}", code=status_code, message=message)


def _site_charts(spend: dict[str, SpendSeries]) -> list[tuple[str, Markup]]:
    """One small chart per charged site: cumulative epsilon, and its budget dashed."""
    charts = []
    for i, s in enumerate(sorted((s for s in spend.values() if s.cumulative),
                                 key=lambda s: s.site)):
        color = PALETTE[i % len(PALETTE)]
        series = [Series("spent", s.rounds, s.cumulative, color)]
        if s.budget is not None:
            series.append(Series("budget", [s.rounds[0], s.rounds[-1]], [s.budget, s.budget],
                                 color, dashed=True))
        svg = line_chart(f"{s.site}: epsilon spent vs budget", series, "round", "epsilon",
                         width=520, height=240)
        charts.append((s.site, Markup(svg)))  # report.py escapes every label it draws
    return charts


def create_app(source: ConsoleSource, verifier: Verifier, *, role: str | None = AUDITOR) -> ASGIApp:
    """The console app; ``role`` None drops the certificate check (tests of the views only)."""
    c = Console(source, verifier)
    get = ["GET"]
    routes = [
        Route("/", c.overview, methods=get, name="overview"),
        Route("/runs", c.runs, methods=get),
        Route("/rounds", c.rounds, methods=get),
        Route("/rounds/{number:int}", c.round, methods=get),
        Route("/model", c.model_form, methods=get),
        Route("/model/{version:str}", c.model, methods=get, name="model"),
        Route("/privacy", c.privacy, methods=get),
        Route("/exports", c.exports, methods=get),
        Route("/exports/entries.jsonl", c.export_entries, methods=get),
        Route("/exports/report.html", c.export_report, methods=get),
        Route("/api/overview", c.api_overview, methods=get),
        Route("/api/runs", c.api_runs, methods=get),
        Route("/api/rounds", c.api_rounds, methods=get),
        Route("/api/rounds/{number:int}", c.api_round, methods=get),
        Route("/api/model/{version:str}", c.api_model, methods=get),
        Route("/api/privacy", c.api_privacy, methods=get),
        Route("/api/verify", c.api_verify, methods=get),
    ]
    handlers: dict[Any, Any] = {HTTPException: c.http_error}
    handlers.update(dict.fromkeys(READ_ERRORS, c.read_error))
    app = Starlette(routes=routes, exception_handlers=handlers)
    guarded: ASGIApp = GetOnly(app)
    return RequireRole(guarded, role) if role is not None else guarded
