"""Every node writes the audit entries of the commands its replica applies.

`audit_record` is pure: the same committed command and result give the same entry on
every node, keyed by the state machine's apply sequence number (identical on every
replica), so appends are idempotent when the journal is replayed after a restart.
The SQL write happens on a writer thread, never on the Raft thread.

Because every entry is a function of a committed command, a node's log can be rebuilt
from its Raft journal: a node compacts its journal only once its writer is idle
(`idle`), so the journal holds every command after the log's end. Damage is therefore
named and then healed by a restart: a log whose tail was cut gets the missing entries
again as the journal replays; a log with a hole or a rewritten entry (SQLite) is moved
aside to `<file>.damaged-<time>` and written anew. A node that takes a snapshot (the
leader's, or its own at start) whose log went further than its own log has a hole no
journal can fill: the writer copies those entries from a peer, checked one by one
(`snapshot_installed`).
While a node runs, the writer checks every few seconds that the stored log is still the
one it wrote, and stops writing (logging `audit_damaged`) when it is not.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from coordinator.audit import AuditSigner, AuditStore
from coordinator.audit.entry import Entry
from coordinator.audit.errors import AuditIntegrityError
from coordinator.core import commands

log = logging.getLogger(__name__)

CATCH_UP_BATCH = 200
PeerEntries = Callable[[int, int], list[dict[str, Any]] | None]
CHECK_EVERY_S = 2.0
"""How often the writer checks that the stored log is still the one it wrote."""


class AuditDamaged(AuditIntegrityError):
    """A damaged log this node cannot set aside by itself (not a SQLite file)."""


def _set_aside(url: str, why: str) -> Path:
    """Move a damaged SQLite log (and its WAL files) aside; returns where it went."""
    database = make_url(url).database
    if make_url(url).get_backend_name() != "sqlite" or not database or database == ":memory:":
        raise AuditDamaged(f"the audit log in {url.split('@')[-1]} is damaged ({why}); restore "
                           "it from a backup or empty it, and the node rebuilds it from its "
                           "Raft journal")
    path = Path(database)
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    for suffix in ("", "-wal", "-shm"):
        part = Path(f"{path}{suffix}")
        if part.exists():
            part.rename(Path(f"{aside}{suffix}"))
    return aside


def open_store(url: str, signer: AuditSigner) -> AuditStore:
    """This node's audit store, ready to append. A damaged SQLite log is moved aside, named
    in one log line, and started anew: the Raft journal's replay rebuilds it."""
    for attempt in (1, 2):
        store = AuditStore(url, signer=signer)
        try:
            store.check_writable()  # never start on a log whose appends would all fail
            return store
        except AuditIntegrityError as exc:
            store.close()
            if attempt == 2:
                raise
            aside = _set_aside(url, str(exc))
            log.warning("audit log damaged (%s): moved it to %s; rebuilding it from the Raft "
                        "journal", exc, aside, extra={"event": "audit_rebuilt"})
        except BaseException:
            store.close()
            raise
    raise AssertionError("unreachable")


def config_digest(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def audit_record(command: dict[str, Any], result: dict[str, Any],
                 state: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The (kind, payload) an applied command leaves in the audit log, if any.

    A retried command (same request id) is applied once: its replays leave nothing.
    Every entry names its actor (the operator's certificate name, or `node:ID` of the
    node that submitted it) and the submitting node's wall-clock `time`, both carried
    on the replicated command so that every node writes the same entry.
    """
    if not result.get("ok") or result.get("replayed"):
        return None
    record = _record(command, result, state)
    if record is None:
        return None
    payload = record[1]
    operator = command.get("operator")
    if isinstance(operator, str) and "operator" not in payload:
        payload["operator"] = operator  # who asked, from their certificate's name
    node = command.get("submitted_by")
    actor = operator if isinstance(operator, str) else (
        f"node:{node}" if isinstance(node, str) else None)
    if actor is not None:
        payload.setdefault("actor", actor)
    if isinstance(command.get("time"), str):
        payload.setdefault("time", command["time"])  # the submitting node's wall clock
    return record


def _record(command: dict[str, Any], result: dict[str, Any],
            state: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    op = command.get("op")
    if op == commands.ENROLL:
        site = state["sites"][command["site"]]
        return "client_enrolled", {"site": command["site"], "public_key": site["public_key"],
                                   "epsilon": site["budget"]["epsilon"],
                                   "delta": site["budget"]["delta"]}
    if op == commands.SET_BUDGET and result.get("changed"):
        old, new = result["old_budget"], result["budget"]
        payload = {"site": result["site"], "epsilon": new["epsilon"], "delta": new["delta"],
                   "old_epsilon": old["epsilon"], "old_delta": old["delta"],
                   "spent": result["spent"]}
        if result.get("operator"):
            payload["operator"] = result["operator"]
        return "budget_changed", payload
    if op == commands.REVOKE:
        return "client_revoked", {"site": command["site"]}
    if op == commands.QUARANTINE:
        return "client_quarantined", {k: result[k] for k in ("site", "reason", "round", "attempt")}
    if op == commands.GENESIS and result.get("new"):
        return "model_genesis", {"version": command["version"], "size": command["size"],
                                 "round": result["round"]}
    if op == commands.CLAIM and result.get("new"):
        return "leader_claimed", {"term": command["term"], "node": command["node"]}
    if op == commands.TRAIN:
        config = state["training"]["config"]  # in full: secure aggregation on or off, etc.
        run = state["runs"][result["run"]]
        return "training_requested", {"rounds": command["rounds"], "run": result["run"],
                                      "task": run["task"], "base": run["base"],
                                      "first_round": run["first_round"],
                                      "target_round": result["target_round"],
                                      "config_digest": config_digest(config),
                                      "config": dict(config)}
    if op == commands.ROUND_OPEN:
        r = state["round"]
        return "round_opened", {"round": r["round"], "attempt": r["attempt"], "term": r["term"],
                                "base": r["base"], "participants": r["participants"],
                                "config_digest": config_digest(r["config"]),
                                "config": dict(r["config"]), "run": r.get("run")}
    if op == commands.ROUND_ABORT:
        a = state["history"][command["round"]]["aborted"][-1]
        return "round_aborted", {"round": command["round"], "attempt": command["attempt"],
                                 "term": command["term"], "reason": a["reason"],
                                 "charges": a["charges"]}
    if op == commands.ROUND_COMMIT:
        c = state["history"][command["round"]]["committed"]
        return "round_committed", {
            "round": command["round"], "attempt": c["attempt"], "term": c["term"],
            "version": c["version"], "parent": c["parent"], "size": command["size"],
            "participants": c["participants"], "survivors": c["survivors"],
            "metrics": c["metrics"], "charges": c.get("charges", {}),
            "site_metrics": c.get("site_metrics", {}), "run": state["training"].get("run"),
        }
    if op == commands.STOP:
        payload = {"target_round": result["target_round"], "reason": result["reason"],
                   "run": result.get("run")}
        payload.update({k: result[k] for k in ("operator", "node") if k in result})
        return "training_stopped", payload
    if op == commands.RUN_EVALUATED:
        return "run_evaluated", {k: result[k] for k in ("run", "version", "metrics",
                                                        "site_metrics", "term")}
    if op == commands.LATE_CHARGE:
        return "charge_recorded", {"round": result["round"], "attempt": result["attempt"],
                                   "term": result["term"], "site": result["site"],
                                   "charges": {result["site"]: result["charge"]},
                                   "overspent": result["overspent"]}
    if op == commands.MEMBERSHIP:
        payload = {"change": result["change"], "node": result["node"],
                   "node_id": result["node_id"], "members": result["members"]}
        if result.get("operator"):
            payload["operator"] = result["operator"]
        return "membership_changed", payload
    return None


class AuditWriter:
    """Feeds applied commands, in apply order, into this node's SQL audit log."""

    def __init__(self, url: str, signer: AuditSigner,
                 on_written: Callable[[str], None] | None = None,
                 from_peers: PeerEntries | None = None) -> None:
        """`on_written(kind)` hears of each entry actually appended (metrics), not of
        replays of entries the log already holds. `from_peers(after, limit)` gives a
        peer's entries for commands after `after` (as dicts), for the catch-up after a
        snapshot."""
        self.store = open_store(url, signer)
        self._from_peers = from_peers
        try:
            head = self.store.head()
        except Exception:  # unreadable now: the writer thread tries again
            head = None
        # the command (state seq) of the last entry in the stored log: read before the
        # node's first compaction can record it in a snapshot
        self._through = head.raft_index if head is not None and head.raft_index else 0
        self.damage: str | None = None  # why the stored log stopped being the one written
        self._on_written = on_written
        self._closing = threading.Event()
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def idle(self) -> bool:
        """Every applied command's entry is stored (and the log is sound): the journal
        may be compacted up to here without losing what rebuilds the log."""
        return self.damage is None and self._queue.unfinished_tasks == 0

    def through(self) -> int:
        """The command (state seq) of the last entry this node's log holds."""
        return self._through

    def snapshot_installed(self, audit_through: int) -> None:
        """This node took a snapshot whose log went up to command `audit_through`: once
        the entries queued before it are written, a log that ends earlier has a hole the
        journal can no longer fill, and is named damaged."""
        self._queue.put(("snapshot", audit_through))

    def record(self, command: dict[str, Any], result: dict[str, Any], state: dict[str, Any]) -> None:
        """Queue the entry of an applied command. Its payload is copied now: it may share
        objects with the state, which later commands change (a `late_charge` adds to the
        charges of an aborted attempt) before the writer thread gets to it."""
        entry = audit_record(command, result, state)
        if entry is not None:
            self._queue.put((state["seq"], entry[0], copy.deepcopy(entry[1])))

    def _run(self) -> None:
        head = None
        try:
            head = self.store.head()
        except Exception:
            log.exception("audit log head unreadable")
        written = head.seq if head is not None else -1
        checked = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=CHECK_EVERY_S)
            except queue.Empty:
                item = ()
            if item is None:
                return
            try:
                if time.monotonic() - checked >= CHECK_EVERY_S:
                    checked = time.monotonic()
                    self._check()
                if item and self.damage is None:  # a damaged log gets nothing more
                    written = self._handle(item, written)
            finally:
                if item:
                    self._queue.task_done()

    def _handle(self, item: tuple[Any, ...], written: int) -> int:
        if item[0] == "snapshot":
            self._catch_up(item[1])
            return written
        seq, kind, payload = item
        entry = self._append(seq, kind, payload)
        if entry is None:
            return written
        self._through = max(self._through, seq)
        if entry.seq > written:
            written = entry.seq
            if self._on_written is not None:
                self._on_written(kind)
        return written

    def _catch_up(self, target: int) -> None:
        """Copy a peer's entries for the commands up to `target` that this node's snapshot
        covers and its log lacks. Every node's log holds the same entries (each is a
        function of a committed command), so the peer's extend this one exactly, and
        `import_entries` checks each (chain, hash, signature) before it keeps it. Until a
        peer answers, later entries wait: none lands after a hole."""
        waited = 0
        while self._through < target and not self._closing.is_set():
            try:
                batch = self._from_peers(self._through, CATCH_UP_BATCH) if self._from_peers else None
            except Exception as exc:  # peers unreachable (or not known yet): try again
                log.debug("audit catch-up: %s", exc)
                batch = []
            if batch is None:
                self._damaged(f"this node took a snapshot whose audit log goes on to command "
                              f"{target}, its own ends at command {self._through}, and it has "
                              "no peer to copy the entries in between from")
                return
            if batch and batch[0]["raft_index"] > target:
                self._through = target  # no command in the gap wrote an entry
                return
            batch = [d for d in batch if d["raft_index"] <= target]
            if not batch:
                if waited % 15 == 0:
                    log.warning("audit log ends at command %d, its snapshot at %d: waiting "
                                "for a peer to copy the entries in between from", self._through,
                                target, extra={"event": "audit_catch_up_waiting"})
                waited += 1
                self._closing.wait(2.0)
                continue
            if not self._import(batch):
                return

    def _import(self, batch: list[dict[str, Any]]) -> bool:
        """Keep a peer's entries (each checked by `import_entries`); False once the log is
        named damaged. An empty log first gets its genesis (the same on every node: one
        cluster key), so a peer's first entry extends it."""
        try:
            if self.store.head() is None:
                self.store.ensure_genesis()
            entries = [Entry.from_dict(d) for d in batch]
            self.store.import_entries(entries)
        except (OSError, OperationalError) as exc:  # the database cannot write now: later
            log.error("audit catch-up could not write (%s); retrying", exc)
            self._closing.wait(2.0)
            return True
        except Exception as exc:  # not an extension of this log, or not an entry at all
            self._damaged(f"a peer's audit entries do not extend this log: {exc}")
            return False
        self._through = entries[-1].raft_index
        log.info("audit log: copied %d entries from a peer, now through command %d",
                 len(entries), self._through, extra={"event": "audit_caught_up"})
        return True

    def _check(self) -> None:
        if self.damage is not None:
            return
        try:
            damage = self.store.damage()
        except Exception as exc:  # unreadable now (a restarting server): try again later
            log.debug("audit log check failed: %s", exc)
            return
        if damage is not None:
            self._damaged(damage)

    def _damaged(self, why: str) -> None:
        self.damage = why
        log.error("audit log damaged: %s; this node stopped writing it. Restart the node: it "
                  "rebuilds the log from its Raft journal (and its snapshot's check names "
                  "what the journal no longer holds)", why, extra={"event": "audit_damaged"})

    def _append(self, seq: int, kind: str, payload: dict[str, Any]) -> Any:
        """Append one entry; a database that cannot write now (a full disk, a restarting
        server) is retried every second, never skipped, so that no later entry lands
        after a gap. An entry the store refuses is logged and skipped."""
        waited = 0
        while True:
            try:
                return self.store.append(kind, payload, raft_index=seq)
            except (OSError, OperationalError) as exc:
                if self._closing.is_set():
                    return None
                if waited % 60 == 0:
                    log.error("audit append for command %s (%s) failed, retrying: %s", seq,
                              kind, str(exc).splitlines()[0] if str(exc) else exc)
                waited += 1
                self._closing.wait(1.0)
            except AuditIntegrityError as exc:
                self._damaged(str(exc))
                return None
            except Exception:
                log.exception("audit append failed for command %s (%s)", seq, kind)
                return None

    def latest_head(self) -> dict[str, Any] | None:
        """A signed head over this node's log as it stands, or None (empty, or unreadable).
        Signed on demand (the leader's publisher asks every few seconds), not per append."""
        try:
            head = self.store.signed_head()
        except Exception:
            log.exception("audit head not signed")
            return None
        return head.to_dict() if head is not None else None

    def close(self) -> None:
        self._closing.set()
        self._queue.put(None)
        self._thread.join(5)
        self.store.close()


def load_signer(path: Path) -> AuditSigner:
    return AuditSigner.from_file(path)
