"""Late charges: DP runs a site's accountant charged that the ledger never recorded.

A leader that dies holding sites' privatized updates aborts nothing itself; its successor
aborts the attempt without their charges. The sites report such runs as unsettled with
every Poll and Submit (`wire.unsettled_run`); `settle` answers what the ledger says of
each and queues the ones it may still charge, and the driver records them between
attempts (`record`), each over its site's current history, one at a time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from coordinator import wire
from coordinator.cluster.replica import Replica
from coordinator.core import commands
from coordinator.core.queries import charge_status
from coordinator.round.charges import ChargePool
from privacy.accounting import CHARGE_FIELDS

log = logging.getLogger(__name__)


class LateCharges:
    def __init__(self, replica: Replica, charges: ChargePool) -> None:
        self.replica = replica
        self.charges = charges
        self._queue: dict[tuple[str, int, int], dict[str, Any]] = {}
        self._lock = threading.Lock()

    def settle(self, site: str, reported: Any) -> list[dict[str, Any]]:
        """The ledger's answer on the DP runs a site reports as unsettled: `charged`,
        `uncharged` or `invalid` for each run the site may forget. A run in an attempt
        aborted without its charge is queued for `late_charge` and stays unanswered until
        that applies."""
        if not isinstance(reported, list):
            return []
        runs: dict[tuple[int, int], dict[str, Any] | None] = {}
        for raw in reported[:wire.MAX_UNSETTLED]:
            run = wire.unsettled_run(raw)
            if run is not None:
                runs[(run["round"], run["attempt"])] = run
            elif isinstance(raw, dict) and all(
                    type(raw.get(k)) is int for k in ("round", "attempt")):
                runs[(raw["round"], raw["attempt"])] = None
        statuses = self.replica.state.read(
            lambda st: {k: charge_status(st, site, *k) for k in runs})
        answers = []
        for (rnd, attempt), run in runs.items():
            status = "invalid" if run is None else statuses[(rnd, attempt)]
            if run is not None and status == "chargeable":
                with self._lock:
                    self._queue.setdefault((site, rnd, attempt), run)
            elif status != "pending":
                answers.append({"round": rnd, "attempt": attempt, "status": status})
        return answers

    def record(self, term: int, go_on: Callable[[], bool],
               submit: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
        """Record the queued late charges; True when any applied.

        Runs in the driver thread between attempts only: every charge is computed over its
        site's current history and applied before the next is computed, and none can slip
        between an open attempt's charge (computed when the update arrived) and its commit.
        """
        with self._lock:
            pending, self._queue = self._queue, {}
        applied = False
        for (site, rnd, attempt), run in pending.items():
            if not go_on():
                break
            applied = self._record_one(term, site, rnd, attempt, run, submit) or applied
        return applied

    def _record_one(self, term: int, site: str, rnd: int, attempt: int, run: dict[str, Any],
                    submit: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
        status, record = self.replica.state.read(
            lambda st: (charge_status(st, site, rnd, attempt), st["sites"].get(site)))
        if status != "chargeable" or record is None:
            return False
        fut = self.charges.submit(record, {f"dp_{k}": run[k] for k in CHARGE_FIELDS})
        if fut is None:
            return False
        try:
            charge = fut.result(timeout=120)
        except Exception as exc:
            log.warning("site %s: late charge for %s.%s not computed (%s)", site, rnd, attempt,
                        exc)
            return False
        r = submit(commands.late_charge(term, rnd, attempt, site, len(record["charges"]), charge))
        extra = {"event": "late_charge", "site": site, "round": rnd, "attempt": attempt,
                 "term": term, "applied": bool(r.get("ok")),
                 "epsilon_total": charge["epsilon_total"]}
        if r.get("overspent"):
            log.error("site %s: late charge for %s.%s takes it to epsilon %.4g, OVER its "
                      "budget: recorded, since the site has spent it", site, rnd, attempt,
                      charge["epsilon_total"], extra=extra | {"overspent": True})
        elif r.get("ok"):
            log.info("site %s charged late for %s.%s: %s", site, rnd, attempt, charge, extra=extra)
        else:
            log.warning("late charge of %s for %s.%s refused: %s", site, rnd, attempt, r,
                        extra=extra)
        return bool(r.get("ok"))
