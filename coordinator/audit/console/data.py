"""What the console shows, apart from HTTP: the verification verdict (kept fresh) and runs.

The verdict is recomputed when the log's size or head changes and, because an edited row
changes neither, also once it is older than ``recheck`` seconds (0: on every request). The
banner says when it was computed, so a stale green is visible as such.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError

from coordinator.audit.bundle import BundleError
from coordinator.audit.entry import MODEL_KINDS, ROUND_COMMITTED, Entry
from coordinator.audit.query import RoundView, SpendSeries
from coordinator.audit.verify import KeyInForce, VerifyReport
from privacy.accounting import within_budget

TRAINING_REQUESTED = "training_requested"
TRAINING_STOPPED = "training_stopped"
READ_ERRORS: tuple[type[BaseException], ...] = (SQLAlchemyError, BundleError, OSError)
"""What reading a log that went away raises; pages turn these into a 503, not a trace."""


class ConsoleSource(Protocol):
    """An ``AuditStore`` or a ``Bundle``: what the console reads."""

    def describe(self) -> str: ...
    def __len__(self) -> int: ...
    def rounds(
        self, since: int | None = None, until: int | None = None, site: str | None = None
    ) -> list[RoundView]: ...
    def round(self, number: int) -> RoundView | None: ...
    def lineage(self, version: str) -> list[Entry]: ...
    def spend(self) -> dict[str, SpendSeries]: ...
    def keys(self) -> list[KeyInForce]: ...
    def verify(self, **options: Any) -> VerifyReport: ...


@dataclass(frozen=True, slots=True)
class Verification:
    """One verdict on the log, with what the banner needs to say about it."""

    report: VerifyReport | None
    checked_at: dt.datetime
    pinned_key: str | None  # key id the signer was pinned to, if any
    error: str | None = None  # the log could not be read at all

    @property
    def status(self) -> str:
        """ok (verified under a pinned signer), unpinned, failed, or error."""
        if self.error is not None or self.report is None:
            return "error"
        if not self.report.ok:
            return "failed"
        return "ok" if self.report.signer_pinned else "unpinned"

    @property
    def withheld(self) -> str | None:
        """Why the log's contents are not shown (it fails verification), or None.

        As ``fedraft audit rounds/show/model``: nothing of a failing log is shown, only
        its issues; an unpinned log is shown, under the amber banner.
        """
        if self.status not in ("failed", "error"):
            return None
        return f"{self.banner()['title']}; nothing of it is shown (the overview lists the issues)"

    def banner(self) -> dict[str, str]:
        """CSS class, headline and detail of the banner on every page."""
        at = self.checked_at.strftime("%Y-%m-%d %H:%M:%S UTC")
        r = self.report
        if self.status == "error" or r is None:
            return {"status": "error", "title": "log FAILS verification: it cannot be read",
                    "detail": f"{self.error} (checked {at})"}
        if self.status == "failed":
            where = (f"first bad entry seq {r.first_bad_seq}" if r.first_bad_seq is not None
                     else f"checkpoint at tree size {r.bad_checkpoint}")
            return {"status": "failed", "title": f"log FAILS verification: {r.reason}",
                    "detail": f"{where}; {len(r.issues)} issue(s) listed (checked {at})"}
        counts = (f"{r.counts['entries']} entries, {r.counts['signatures']} signatures, "
                  f"{r.counts['checkpoints']} checkpoints; head seq {r.head_seq}")
        if self.status == "unpinned":
            return {"status": "unpinned",
                    "title": "not pinned: the log is self-consistent, but no --key or --head "
                             "pins its signer",
                    "detail": f"{counts} (checked {at})"}
        return {"status": "ok", "title": f"verified under pinned key {self.pinned_key}",
                "detail": f"{counts} (checked {at})"}


class Verifier:
    """Keeps one verdict current for a source; concurrent requests share one recheck."""

    def __init__(
        self,
        source: ConsoleSource,
        options: dict[str, Any],
        *,
        pinned_key: str | None,
        recheck: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.options = options
        self.pinned_key = pinned_key
        self.recheck = recheck
        self._clock = clock
        self._lock = threading.Lock()
        self._last: Verification | None = None
        self._last_at = 0.0
        self._last_mark: tuple[Any, ...] | None = None

    def _mark(self) -> tuple[Any, ...]:
        """Cheap fingerprint of the log's extent: its size and newest entry."""
        head = getattr(self.source, "head", None)
        newest = head() if callable(head) else None
        return (len(self.source), newest.entry_hash if newest is not None else None)

    def current(self) -> Verification:
        """The verdict, recomputed if the log grew or the last one is too old."""
        with self._lock:
            try:
                mark = self._mark()
            except READ_ERRORS as exc:
                return self._store(None, _short(exc), None)
            fresh = (self._last is not None and self._last.error is None
                     and mark == self._last_mark
                     and self._clock() - self._last_at < self.recheck)
            if fresh and self._last is not None:
                return self._last
            try:
                report = self.source.verify(**self.options)
            except READ_ERRORS as exc:
                return self._store(None, _short(exc), None)
            return self._store(report, None, mark)

    def _store(self, report: VerifyReport | None, error: str | None,
               mark: tuple[Any, ...] | None) -> Verification:
        self._last = Verification(report, dt.datetime.now(dt.UTC), self.pinned_key, error)
        self._last_at, self._last_mark = self._clock(), mark
        return self._last


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def all_entries(source: ConsoleSource) -> Iterable[Entry]:
    """Every entry in log order, streamed from a database, listed from a bundle."""
    stream = getattr(source, "iter_entries", None)
    if callable(stream):
        return stream()
    return source.entries()  # type: ignore[attr-defined, no-any-return]


def runs_of(source: ConsoleSource) -> list[dict[str, Any]]:
    """Training runs: the source's own ``runs()`` when it has one, else derived here."""
    native = getattr(source, "runs", None)
    if callable(native):
        return list(native())
    return runs_from_entries(all_entries(source))


def runs_from_entries(entries: Iterable[Entry]) -> list[dict[str, Any]]:
    """Fold training_requested / training_stopped entries into runs, in request order.

    A run keeps the id its entries name (else its number from 1). It is ``stopped`` when a
    stop names it (or follows it), ``finished`` once its target round has been committed,
    ``superseded`` when another request came first, else ``running``.
    """
    runs: list[dict[str, Any]] = []
    committed: set[int] = set()
    for e in entries:
        p = e.payload
        if e.kind == TRAINING_REQUESTED:
            if runs and runs[-1]["status"] == "running":
                done = runs[-1]["target_round"] in committed
                runs[-1]["status"] = "finished" if done else "superseded"
            runs.append(_requested_run(e, len(runs) + 1))
        elif e.kind == TRAINING_STOPPED:
            named = [r for r in runs if p.get("run") is not None and r["run"] == p.get("run")]
            run = named[-1] if named else (runs[-1] if runs else None)
            if run is not None and run["status"] == "running":
                run["status"] = "stopped"
                run["stopped"] = {"seq": e.seq, "reason": p.get("reason"),
                                  "target_round": p.get("target_round"),
                                  "by": p.get("operator") or p.get("node")}
        elif e.kind == ROUND_COMMITTED and type(p.get("round")) is int:
            committed.add(p["round"])
    for run in runs:
        if run["status"] == "running" and run["target_round"] in committed:
            run["status"] = "finished"
    return runs


def _requested_run(e: Entry, number: int) -> dict[str, Any]:
    p = e.payload
    rounds, target, first = p.get("rounds"), p.get("target_round"), p.get("first_round")
    if type(first) is not int and type(rounds) is int and type(target) is int:
        first = target - rounds + 1
    return {"run": p.get("run") or number, "status": "running", "seq": e.seq, "rounds": rounds,
            "first_round": first, "target_round": target, "task": p.get("task"),
            "base": p.get("base"), "config": p.get("config"),
            "config_digest": p.get("config_digest"),
            "operator": p.get("operator") or p.get("actor"), "stopped": None}


def latest_version(source: ConsoleSource) -> str | None:
    """The newest model version in the log (as ``fedraft audit model latest`` takes it)."""
    latest = None
    for e in all_entries(source):
        if e.kind in MODEL_KINDS and isinstance(e.payload.get("version"), str):
            latest = str(e.payload["version"])
    return latest


def spend_dict(spend: dict[str, SpendSeries]) -> dict[str, dict[str, Any]]:
    """Per-site spend as JSON (the shape of ``report.report_dict``'s "spend")."""
    return {k: {"rounds": v.rounds, "cumulative": v.cumulative, "budget": v.budget}
            for k, v in sorted(spend.items())}


def spend_rows(spend: dict[str, SpendSeries]) -> list[dict[str, Any]]:
    """One row per site: epsilon spent (the latest cumulative) against its budget."""
    rows = []
    for s in sorted(spend.values(), key=lambda s: s.site):
        spent = s.cumulative[-1] if s.cumulative else 0.0
        remaining = s.budget - spent if s.budget is not None else None
        rows.append({"site": s.site, "charged_rounds": len(s.rounds), "spent": spent,
                     "budget": s.budget, "remaining": remaining,
                     "over": s.budget is not None and not within_budget(spent, s.budget)})
    return rows
