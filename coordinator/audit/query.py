"""Auditor views over entries (pure): rounds, one round, a model's lineage, privacy spend.

Both the SQL store (after narrowing rows in SQL) and an exported bundle (all in memory) feed
entries through these functions, so ``fedraft audit`` answers the same way from either.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from coordinator.audit.entry import (
    BUDGET_CHANGED,
    CHARGE_RECORDED,
    CLIENT_ENROLLED,
    MODEL_GENESIS,
    ROUND_ABORTED,
    ROUND_COMMITTED,
    ROUND_KINDS,
    ROUND_OPENED,
    Entry,
)


class LineageError(LookupError):
    """A model version that is unknown, ambiguous, or whose ancestry is broken."""


@dataclass(slots=True)
class Attempt:
    """One attempt at a round: opened, then committed or aborted (or still open)."""

    attempt: int
    term: int | None = None
    status: str = "open"
    participants: list[str] = field(default_factory=list)
    survivors: list[str] = field(default_factory=list)
    base: str | None = None
    config_digest: str | None = None
    version: str | None = None
    parent: str | None = None
    size: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)
    reason: str | None = None
    seqs: list[int] = field(default_factory=list)
    ended_term: int | None = None  # of the leader that committed or aborted it
    run: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    opened_at: str | None = None  # the leader's wall clock
    ended_at: str | None = None


@dataclass(slots=True)
class RoundView:
    """A round with all its attempts; ``status`` is that of the last attempt."""

    round: int
    attempts: list[Attempt]

    @property
    def final(self) -> Attempt:
        """The attempt that decides the round's outcome (the last one)."""
        return self.attempts[-1]

    @property
    def status(self) -> str:
        return self.final.status

    @property
    def sites(self) -> set[str]:
        """Every site named in any attempt, for ``--site`` filtering."""
        out: set[str] = set()
        for a in self.attempts:
            out.update(a.participants, a.survivors, a.charges)
        return out

    @property
    def epsilon_spent(self) -> float:
        """Sum of the epsilon charged to all sites over all attempts of this round.

        Every attempt that reached a commit is charged; an aborted attempt's charges are
        recorded only if the coordinator recorded them.
        """
        return sum(
            float(c.get("epsilon", 0.0)) for a in self.attempts for c in a.charges.values()
        )

    def summary(self) -> dict[str, Any]:
        """One line of ``audit rounds``."""
        f = self.final
        return {
            "round": self.round,
            "status": self.status,
            "attempts": len(self.attempts),
            "term": f.term,
            "participants": f.participants,
            "survivors": f.survivors,
            "version": f.version,
            "parent": f.parent,
            "metrics": f.metrics,
            "epsilon": self.epsilon_spent,
            "reason": f.reason,
            "seqs": [s for a in self.attempts for s in a.seqs],
        }

    def to_dict(self) -> dict[str, Any]:
        """Full detail of ``audit show``."""
        return {"round": self.round, "status": self.status,
                "attempts": [asdict(a) for a in self.attempts]}


def group_rounds(entries: Iterable[Entry]) -> dict[int, RoundView]:
    """Fold round entries into one view per round number, attempts in log order."""
    rounds: dict[int, RoundView] = {}
    for e in entries:
        if e.kind not in ROUND_KINDS:
            continue
        p = e.payload
        number = p.get("round")
        if type(number) is not int:
            continue
        view = rounds.setdefault(number, RoundView(number, []))
        attempt_no = p.get("attempt", 0)
        attempt = next((a for a in view.attempts if a.attempt == attempt_no), None)
        if attempt is None:
            attempt = Attempt(attempt=attempt_no)
            view.attempts.append(attempt)
        attempt.seqs.append(e.seq)
        if e.kind == CHARGE_RECORDED:  # a late charge on an aborted attempt, by a later term
            attempt.charges.update(p.get("charges") or {})
            continue
        if e.kind == ROUND_OPENED:
            attempt.term = p.get("term")
            attempt.participants = list(p.get("participants", []))
            attempt.base = p.get("base")
            attempt.config_digest = p.get("config_digest")
            attempt.config = dict(p.get("config") or {})
            attempt.run = p.get("run")
            attempt.opened_at = p.get("time")
            continue
        # an attempt is ended by the leader of its own term, or aborted by a later one
        attempt.ended_term, attempt.ended_at = p.get("term"), p.get("time")
        if attempt.term is None:
            attempt.term = attempt.ended_term
        if e.kind == ROUND_COMMITTED:
            attempt.status = "committed"
            attempt.participants = list(p.get("participants", attempt.participants))
            attempt.survivors = list(p.get("survivors", []))
            attempt.version = p.get("version")
            attempt.parent = p.get("parent")
            attempt.size = p.get("size")
            attempt.metrics = dict(p.get("metrics") or {})
            attempt.charges = dict(p.get("charges") or {})
            attempt.site_metrics = dict(p.get("site_metrics") or {})
        elif e.kind == ROUND_ABORTED:
            attempt.status = "aborted"
            attempt.reason = p.get("reason")
            attempt.charges = dict(p.get("charges") or {})
    return rounds


def select_rounds(
    entries: Iterable[Entry],
    since: int | None = None,
    until: int | None = None,
    site: str | None = None,
) -> list[RoundView]:
    """Rounds with since <= round <= until that ``site`` (if given) took part in."""
    out = []
    for number, view in sorted(group_rounds(entries).items()):
        if since is not None and number < since:
            continue
        if until is not None and number > until:
            continue
        if site is not None and site not in view.sites:
            continue
        out.append(view)
    return out


def model_index(entries: Iterable[Entry]) -> dict[str, Entry]:
    """Version hash -> the entry that introduced it (model_genesis or round_committed)."""
    index: dict[str, Entry] = {}
    for e in entries:
        if e.kind in (MODEL_GENESIS, ROUND_COMMITTED):
            version = e.payload.get("version")
            if isinstance(version, str):
                index.setdefault(version, e)
    return index


def resolve_version(versions: Iterable[str], prefix: str) -> str:
    """Full version hash from a unique prefix, as an auditor types one from a table."""
    prefix = prefix.strip().lower()
    matches = sorted({v for v in versions if v.startswith(prefix)})
    if not matches:
        raise LineageError(f"no model version starts with {prefix!r}")
    if len(matches) > 1:
        raise LineageError(f"{prefix!r} is ambiguous: {len(matches)} versions match")
    return matches[0]


def lineage(entries: Iterable[Entry], version: str) -> list[Entry]:
    """Entries from ``version`` back to its model_genesis, newest first.

    Raises LineageError when the version is unknown or a parent is missing, which for a
    verified log means the version was never produced by this cluster.
    """
    index = model_index(entries)
    full = resolve_version(index, version)
    chain: list[Entry] = []
    seen: set[str] = set()
    current: str | None = full
    while current is not None:
        if current in seen:
            raise LineageError(f"version {current[:16]}... is its own ancestor")
        seen.add(current)
        entry = index.get(current)
        if entry is None:
            raise LineageError(f"parent {current[:16]}... is not in the log")
        chain.append(entry)
        if entry.kind == MODEL_GENESIS:
            break
        parent = entry.payload.get("parent")
        current = parent if isinstance(parent, str) else None
    return chain


@dataclass(slots=True)
class SpendSeries:
    """Cumulative epsilon charged to one site, by round, and its latest budget."""

    site: str
    rounds: list[int] = field(default_factory=list)
    cumulative: list[float] = field(default_factory=list)
    budget: float | None = None


def privacy_spend(entries: Sequence[Entry] | Iterable[Entry]) -> dict[str, SpendSeries]:
    """Per-site cumulative epsilon over committed and aborted attempts (late charges
    included, in log order), plus budgets.

    Charges that record `epsilon_total` (the site's spend under the PRV accountant over
    its whole history, what the ledger caps) are taken as they are; older charges
    without it are summed (basic composition, an upper bound).
    """
    series: dict[str, SpendSeries] = {}
    for e in entries:
        p = e.payload
        if e.kind in (CLIENT_ENROLLED, BUDGET_CHANGED) and isinstance(p.get("site"), str):
            s = series.setdefault(p["site"], SpendSeries(p["site"]))
            if isinstance(p.get("epsilon"), int | float):
                s.budget = float(p["epsilon"])
        elif e.kind in (ROUND_COMMITTED, ROUND_ABORTED, CHARGE_RECORDED):
            charges = p.get("charges") or {}
            for site in sorted(charges):
                eps = charges[site].get("epsilon") if isinstance(charges[site], dict) else None
                if not isinstance(eps, int | float):
                    continue
                s = series.setdefault(site, SpendSeries(site))
                total = (s.cumulative[-1] if s.cumulative else 0.0) + float(eps)
                if isinstance(charges[site].get("epsilon_total"), int | float):
                    total = float(charges[site]["epsilon_total"])
                s.rounds.append(int(p.get("round", len(s.rounds))))
                s.cumulative.append(total)
    return series
