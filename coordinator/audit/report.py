"""Self-contained HTML audit report: verification result, rounds, and charts as inline SVG.

Inline SVG rather than matplotlib PNGs: no plotting dependency on coordinator machines, the
file stays small and text-searchable, and it opens offline in any browser.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from coordinator.audit.query import RoundView, SpendSeries
from coordinator.audit.verify import KeyInForce, VerifyReport
from privacy.accounting import within_budget

PALETTE = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939",
)
MAX_SERIES = 12


class ReportSource(Protocol):
    """What the report reads: an ``AuditStore`` or a ``Bundle``."""

    def describe(self) -> str: ...
    def rounds(
        self, since: int | None = None, until: int | None = None, site: str | None = None
    ) -> list[RoundView]: ...
    def spend(self) -> dict[str, SpendSeries]: ...
    def keys(self) -> list[KeyInForce]: ...


@dataclass(frozen=True, slots=True)
class Series:
    """One line on a chart."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: str
    dashed: bool = False


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1-2-5 steps), so axes read naturally."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    value = start
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < hi:
        ticks.append(round(value, 12))
    return ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.2g}"
    return f"{value:.3g}"


def line_chart(
    title: str,
    series: Sequence[Series],
    x_label: str,
    y_label: str,
    width: int = 760,
    height: int = 340,
) -> str:
    """An SVG line chart with axes, ticks, grid and legend."""
    left, right, top, bottom = 64, 170, 36, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for s in series for x in s.xs]
    ys = [y for s in series for y in s.ys]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}" '
        'font-family="system-ui, sans-serif" font-size="11" fill="#333">',
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
        f'<text x="{left}" y="22" font-size="14" font-weight="600">{_esc(title)}</text>',
    ]
    if not xs:
        parts.append(
            f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" text-anchor="middle" '
            'fill="#777">no data</text></svg>'
        )
        return "".join(parts)
    x_ticks = _nice_ticks(min(xs), max(xs))
    y_ticks = _nice_ticks(min(0.0, min(ys)), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (y - y0) / (y1 - y0) * plot_h

    for t in y_ticks:
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
            'stroke="#eee"/>'
            f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>'
        )
    for t in x_ticks:
        parts.append(
            f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top + plot_h}" '
            f'y2="{top + plot_h + 4}" stroke="#999"/>'
            f'<text x="{px(t):.1f}" y="{top + plot_h + 18}" text-anchor="middle">{_fmt(t)}</text>'
        )
    parts.append(
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#bbb"/>'
        f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">'
        f"{_esc(x_label)}</text>"
        f'<text transform="translate(14 {top + plot_h / 2}) rotate(-90)" '
        f'text-anchor="middle">{_esc(y_label)}</text>'
    )
    for i, s in enumerate(series):
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(s.xs, s.ys, strict=True))
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{s.color}" '
            f'stroke-width="2"{dash}/>'
        )
        if len(s.xs) <= 60 and not s.dashed:
            parts.extend(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{s.color}"/>'
                for x, y in zip(s.xs, s.ys, strict=True)
            )
        ly = top + 8 + i * 18
        parts.append(
            f'<line x1="{width - right + 14}" x2="{width - right + 36}" y1="{ly}" y2="{ly}" '
            f'stroke="{s.color}" stroke-width="2"{dash}/>'
            f'<text x="{width - right + 42}" y="{ly + 4}">{_esc(s.label[:20])}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def metric_charts(rounds: Sequence[RoundView]) -> list[str]:
    """One chart per metric recorded by committed rounds, accuracy first."""
    committed = [r for r in rounds if r.status == "committed"]
    names: list[str] = []
    for r in committed:
        for name in r.final.metrics:
            if name not in names:
                names.append(name)
    names.sort(key=lambda n: (n != "accuracy", n))
    charts = []
    for i, name in enumerate(names[:6]):
        pts = [(r.round, r.final.metrics[name]) for r in committed if name in r.final.metrics]
        series = Series(name, [p[0] for p in pts], [float(p[1]) for p in pts],
                        PALETTE[i % len(PALETTE)])
        charts.append(line_chart(f"{name} by round", [series], "round", name))
    return charts


def epsilon_chart(spend: dict[str, SpendSeries]) -> tuple[str, int]:
    """Cumulative epsilon per site (budgets dashed); returns the SVG and sites left out."""
    ranked = sorted(spend.values(), key=lambda s: -(s.cumulative[-1] if s.cumulative else 0))
    shown = [s for s in ranked if s.cumulative][:MAX_SERIES]
    series: list[Series] = []
    for i, s in enumerate(shown):
        color = PALETTE[i % len(PALETTE)]
        series.append(Series(s.site, s.rounds, s.cumulative, color))
        if s.budget is not None:
            series.append(Series(f"{s.site} budget", [s.rounds[0], s.rounds[-1]],
                                 [s.budget, s.budget], color, dashed=True))
    left_out = sum(1 for s in ranked if s.cumulative) - len(shown)
    return line_chart("cumulative epsilon by site", series, "round", "epsilon"), left_out


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;
border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;font-size:.85rem;width:100%}
th,td{border-bottom:1px solid #eee;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f6f6f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:.8rem}.ok{color:#137333;font-weight:600}.bad{color:#b00020;font-weight:600}
.muted{color:#777}svg{max-width:100%;height:auto;margin:.5rem 0}
"""


def build_report(source: ReportSource, verification: VerifyReport | None) -> str:
    """The whole report as one HTML document with no external resources."""
    rounds = source.rounds()
    spend = source.spend()
    keys = source.keys()
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>fedraft audit report</title><style>{_CSS}</style></head><body>",
        "<h1>fedraft audit report</h1>",
        f"<p class='muted'>source <code>{_esc(source.describe())}</code> &middot; "
        f"generated {_esc(now)}</p>",
    ]
    # A section that follows a table opens with the tag that closes it.
    out += _verification_section(verification)
    out += _summary_section(rounds, spend)
    out += _keys_section(keys)
    out += _quality_section(rounds)
    out += _privacy_section(spend)
    out += _rounds_section(rounds)
    out.append("</table></body></html>")
    return "\n".join(out)


def _verification_section(verification: VerifyReport | None) -> list[str]:
    """The verification result: counts when it passed, the issues when it failed."""
    out = ["<h2>Verification</h2>"]
    if verification is None:
        out.append("<p class='muted'>not run</p>")
    elif verification.ok:
        c = verification.counts
        out.append(
            f"<p class='ok'>log verifies: {c['entries']} entries, {c['signatures']} "
            f"signatures, {c['checkpoints']} checkpoints, {c['key_rotations']} key "
            f"rotations, {c['blobs']} blobs, {c['charges']} privacy charges checked"
            + (f" ({c['charges_unchecked']} not recomputed)" if c.get("charges_unchecked")
               else "") + "</p>"
        )
    else:
        where = (
            f"first bad entry: seq {verification.first_bad_seq}"
            if verification.first_bad_seq is not None
            else f"bad checkpoint at tree size {verification.bad_checkpoint}"
        )
        out.append(f"<p class='bad'>log FAILS verification &middot; {_esc(where)}: "
                   f"{_esc(verification.reason)}</p><table><tr><th>seq</th><th>check</th>"
                   "<th>reason</th></tr>")
        for issue in verification.issues[:50]:
            seq = issue.seq if issue.seq is not None else f"checkpoint {issue.checkpoint}"
            out.append(f"<tr><td>{_esc(seq)}</td><td>{_esc(issue.check)}</td>"
                       f"<td>{_esc(issue.reason)}</td></tr>")
        out.append("</table>")
    if verification is not None:
        for warning in verification.warnings:
            out.append(f"<p class='muted'>note: {_esc(warning)}</p>")
    return out


def _summary_section(rounds: Sequence[RoundView], spend: dict[str, SpendSeries]) -> list[str]:
    """Round counts, the latest model version and how many sites were charged."""
    committed = [r for r in rounds if r.status == "committed"]
    out = ["<h2>Summary</h2><table>"]
    latest = committed[-1].final.version if committed else None
    rows = [
        ("rounds", len(rounds)),
        ("committed", len(committed)),
        ("aborted", sum(1 for r in rounds if r.status == "aborted")),
        ("retried attempts", sum(len(r.attempts) - 1 for r in rounds)),
        ("latest model version", latest or "-"),
        ("sites charged", len([s for s in spend.values() if s.cumulative])),
    ]
    out.extend(f"<tr><th>{_esc(k)}</th><td><code>{_esc(v)}</code></td></tr>" for k, v in rows)
    return out


def _keys_section(keys: Sequence[KeyInForce]) -> list[str]:
    """The audit keys of the rotation chain."""
    out = ["</table><h2>Audit keys</h2><table><tr><th>key id</th><th>public key</th>"
           "<th>signs from seq</th></tr>"]
    out.extend(
        f"<tr><td><code>{_esc(k.key_id)}</code></td><td><code>{_esc(k.public_key)}</code></td>"
        f"<td class='num'>{k.from_seq}</td></tr>"
        for k in keys
    )
    return out


def _quality_section(rounds: Sequence[RoundView]) -> list[str]:
    """A chart per recorded metric."""
    out = ["</table><h2>Model quality</h2>"]
    charts = metric_charts(rounds)
    out.extend(charts or ["<p class='muted'>no metrics recorded</p>"])
    return out


def _privacy_section(spend: dict[str, SpendSeries]) -> list[str]:
    """The cumulative epsilon chart and each site's spend against its budget."""
    out = ["<h2>Privacy spend</h2>"]
    chart, left_out = epsilon_chart(spend)
    out.append(chart)
    if left_out:
        out.append(f"<p class='muted'>{left_out} more sites not drawn; see the table.</p>")
    out.append("<table><tr><th>site</th><th>rounds charged</th><th>epsilon spent (sum)</th>"
               "<th>budget</th><th>remaining</th></tr>")
    for s in sorted(spend.values(), key=lambda s: s.site):
        spent = s.cumulative[-1] if s.cumulative else 0.0
        remaining = f"{s.budget - spent:.4g}" if s.budget is not None else "-"
        over = s.budget is not None and not within_budget(spent, s.budget)
        cls = " class='bad'" if over else ""
        out.append(
            f"<tr><td>{_esc(s.site)}</td><td class='num'>{len(s.rounds)}</td>"
            f"<td class='num'>{spent:.4g}</td><td class='num'>"
            f"{'-' if s.budget is None else f'{s.budget:.4g}'}</td>"
            f"<td class='num'{cls}>{remaining}</td></tr>"
        )
    return out


def _rounds_section(rounds: Sequence[RoundView]) -> list[str]:
    """One row per round: outcome, attempts, participants, version, metrics, epsilon."""
    out = ["</table><h2>Rounds</h2><table><tr><th>round</th><th>status</th>"
           "<th>attempts</th><th>participants</th><th>survivors</th><th>version</th>"
           "<th>metrics</th><th>epsilon</th></tr>"]
    for r in rounds:
        f = r.final
        metrics = ", ".join(f"{k}={_fmt(float(v))}" for k, v in sorted(f.metrics.items()))
        out.append(
            f"<tr><td class='num'>{r.round}</td><td>{_esc(r.status)}"
            f"{' (' + _esc(f.reason) + ')' if f.reason else ''}</td>"
            f"<td class='num'>{len(r.attempts)}</td><td class='num'>{len(f.participants)}</td>"
            f"<td class='num'>{len(f.survivors)}</td>"
            f"<td><code>{_esc((f.version or '-')[:16])}</code></td><td>{_esc(metrics)}</td>"
            f"<td class='num'>{r.epsilon_spent:.4g}</td></tr>"
        )
    return out


def report_dict(source: ReportSource) -> dict[str, Any]:
    """The data behind the report, for callers that draw their own."""
    return {
        "rounds": [r.summary() for r in source.rounds()],
        "spend": {k: {"rounds": v.rounds, "cumulative": v.cumulative, "budget": v.budget}
                  for k, v in source.spend().items()},
    }
