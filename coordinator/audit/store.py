"""The SQL shell around the audit core: append, read, and verify a log in SQLite or PostgreSQL.

Each coordinator node owns one ``AuditStore`` (SQLite file by default, PostgreSQL in
production) and calls ``append`` for every applied Raft command that the audit trail records.
Appends are idempotent on the Raft index, so replaying the Raft log after a restart writes
nothing twice, and deterministic (Ed25519 signs deterministically), so all nodes holding the
cluster audit key produce the same entries hash for hash. Tables, engines and the mapping
between rows and entries live in ``sql``; the errors raised here in ``errors``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from coordinator.audit import bundle as bundle_mod
from coordinator.audit.canonical import CanonicalError, canonical_text, normalize
from coordinator.audit.entry import (
    BUDGET_CHANGED,
    CHARGE_RECORDED,
    CLIENT_ENROLLED,
    ENTRY_CONTEXT,
    GENESIS,
    GENESIS_RAFT_INDEX,
    KEY_KINDS,
    KEY_ROTATION,
    MODEL_KINDS,
    ROUND_ABORTED,
    ROUND_COMMITTED,
    ROUND_KINDS,
    Checkpoint,
    Entry,
    PayloadError,
    checkpoint_message,
    compute_entry_hash,
    validate_kind,
    validate_payload,
)
from coordinator.audit.errors import (
    AuditConflictError,
    AuditError,
    AuditGapError,
    AuditIntegrityError,
    AuditOrderError,
    AuditSchemaError,
)
from coordinator.audit.keys import (
    ALGORITHM,
    AuditKeyError,
    AuditSigner,
    SignatureChecker,
    key_id_for,
    parse_public_key,
)
from coordinator.audit.query import (
    RoundView,
    SpendSeries,
    group_rounds,
    lineage,
    privacy_spend,
    select_rounds,
)
from coordinator.audit.sql import (
    LogHead,
    checkpoints_table,
    entries_table,
    entry_from_row,
    indexed_columns,
    insert_entry,
    make_engine,
    prepare_schema,
    read_head,
    redact_url,
    tail_problem,
    upgrade_schema,
)
from coordinator.audit.verify import Issue, KeyInForce, VerifyReport, verify_log

DEFAULT_CHECKPOINT_EVERY = 256
_E = entries_table.c


class AuditStore:
    """Append-only, hash-chained, signed audit log in a SQL database.

    ``signer`` is the cluster audit key (``signers`` may add the keys a log has rotated to);
    without one the store is read-only. ``checkpoint_every`` entries a signed Merkle tree head
    is stored. ``genesis_info`` (plain JSON, e.g. the cluster name) goes into the genesis
    entry, which the first ``append`` writes when the log is empty. ``migrate=False`` opens
    an existing schema without DDL, as an auditor with read-only rights must.
    """

    def __init__(
        self,
        url: str,
        *,
        signer: AuditSigner | None = None,
        signers: Iterable[AuditSigner] = (),
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        genesis_info: Mapping[str, Any] | None = None,
        schema: str | None = None,
        migrate: bool = True,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        self.url = url
        self.schema = schema
        self.checkpoint_every = checkpoint_every
        all_signers = [s for s in (signer, *signers) if s is not None]
        self._signers: dict[str, AuditSigner] = {s.key_id: s for s in all_signers}
        self._first_signer = all_signers[0] if all_signers else None
        info = normalize(dict(genesis_info or {}))
        assert isinstance(info, dict)
        clash = {"alg", "public_key", "key_id"} & info.keys()
        if clash:
            raise PayloadError(f"genesis_info may not set {sorted(clash)}")
        self._genesis_info: dict[str, Any] = info
        self._lock = threading.RLock()
        self._head: LogHead | None = None
        self.engine = make_engine(url, schema, writer=migrate)
        try:
            prepare_schema(self.engine, url, schema, migrate=migrate)
        except BaseException:
            self.engine.dispose()
            raise

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """Where this log lives, without credentials."""
        return redact_url(self.url)

    # --- writing ---------------------------------------------------------------------------

    def add_signer(self, signer: AuditSigner) -> None:
        """Make another key available (e.g. the next key before its rotation is applied)."""
        with self._lock:
            self._signers[signer.key_id] = signer
            if self._first_signer is None:
                self._first_signer = signer

    def append(
        self,
        kind: str,
        payload: Mapping[str, Any],
        raft_index: int,
        *,
        expected_seq: int | None = None,
    ) -> Entry:
        """Record the effect of the Raft command at ``raft_index``; returns the stored entry.

        Idempotent: the same ``raft_index`` again returns the stored entry and writes
        nothing; with a different kind or payload it raises AuditConflictError. A new
        ``raft_index`` must exceed every recorded one (Raft applies in index order), else
        AuditOrderError. ``expected_seq`` (the replicated count of audited commands, the
        genesis being seq 0) guards against a node that skipped commands, e.g. after
        restoring a Raft snapshot: if the entry would land elsewhere, AuditGapError is
        raised and nothing is written; catch up with ``import_entries`` from a peer.
        Payloads of known kinds are checked (PayloadError) and must be plain JSON
        (CanonicalError). Thread-safe; appends are serialised.
        """
        validate_kind(kind)
        if kind in KEY_KINDS:
            raise PayloadError(f"{kind} entries are written by the store itself")
        return self._append(kind, payload, raft_index, None, expected_seq)

    def rotate_key(
        self,
        new_signer: AuditSigner,
        raft_index: int,
        reason: str | None = None,
        *,
        expected_seq: int | None = None,
    ) -> Entry:
        """Hand the log over to ``new_signer``: a key_rotation entry signed by the current key.

        Call it when the Raft command that rotates the audit key applies; every later entry
        and checkpoint is signed by the new key. Idempotent on ``raft_index`` like ``append``.
        """
        payload: dict[str, Any] = {
            "alg": ALGORITHM,
            "public_key": new_signer.public_key_hex,
            "key_id": new_signer.key_id,
        }
        if reason is not None:
            payload["reason"] = reason
        self.add_signer(new_signer)
        return self._append(KEY_ROTATION, payload, raft_index, new_signer, expected_seq)

    def check_writable(self) -> None:
        """Refuse, before the first append, a log this store cannot extend: one whose key in
        force is not among its signers (another cluster's log, or the wrong audit key).
        Appends to it would all fail; a node must not start on it and skip them silently."""
        with self._lock:
            head = self._load_head()
        if head.size and (head.key_id is None or head.key_id not in self._signers):
            mine = ", ".join(sorted(self._signers)) or "none"
            raise AuditKeyError(
                f"the audit log in {self.describe()} is signed by key {head.key_id}, not by this "
                f"node's audit key ({mine}): it holds another cluster's log, or [audit] key is "
                "the wrong file")

    def ensure_genesis(self) -> Entry:
        """Write the genesis entry if the log is empty; return it either way."""
        with self._lock:
            head = self._load_head()
            if head.size == 0:
                self._write_genesis(head)
            entry = self.get(0)
            assert entry is not None
            return entry

    def _append(
        self,
        kind: str,
        payload: Mapping[str, Any],
        raft_index: int,
        next_signer: AuditSigner | None,
        expected_seq: int | None,
    ) -> Entry:
        if type(raft_index) is not int or raft_index <= GENESIS_RAFT_INDEX:
            raise ValueError(f"raft_index must be a positive integer, got {raft_index!r}")
        clean = normalize(payload)
        assert isinstance(clean, dict)
        validate_payload(kind, clean)
        body = canonical_text(clean)
        with self._lock:
            head = self._load_head()
            if head.size and raft_index <= head.last_raft:
                return self._existing(kind, body, raft_index, expected_seq)
            next_seq = max(head.size, 1)  # an empty log gets its genesis first
            if expected_seq is not None and expected_seq != next_seq:
                raise AuditGapError(
                    f"raft index {raft_index} should be seq {expected_seq}, but this log's next"
                    f" seq is {next_seq}; import the missing entries from a peer first"
                )
            if head.size == 0:
                head = self._write_genesis(head)
            try:
                return self._write(head, kind, clean, body, raft_index, next_signer)
            except IntegrityError:
                # Another process wrote to this log. Re-read it and judge the index again.
                self._head = None
                head = self._load_head()
                if raft_index <= head.last_raft:
                    return self._existing(kind, body, raft_index, expected_seq)
                raise

    def signed_head(self) -> Checkpoint | None:
        """A checkpoint over the whole log as it stands, signed by the key in force: what
        the leader commits through Raft so that a truncated tail shows. None when the log
        is empty or this store cannot sign with that key."""
        with self._lock:
            head = self._load_head()
            signer = self._signers.get(head.key_id or "")
            if head.size == 0 or signer is None or head.key_id is None:
                return None
            root = head.acc.root().hex()
            signature = signer.sign(checkpoint_message(head.size, root, head.key_id)).hex()
            return Checkpoint(head.size, root, head.key_id, signature)

    def _existing(
        self, kind: str, body: str, raft_index: int, expected_seq: int | None
    ) -> Entry:
        stored = self.get_by_raft_index(raft_index)
        if stored is None:
            raise AuditOrderError(
                f"raft index {raft_index} was never recorded but later indexes were;"
                " commands must be recorded in Raft order"
            )
        if stored.kind != kind or canonical_text(stored.payload) != body:
            raise AuditConflictError(
                f"raft index {raft_index} is recorded as seq {stored.seq} ({stored.kind})"
                " with a different payload"
            )
        if expected_seq is not None and stored.seq != expected_seq:
            raise AuditConflictError(
                f"raft index {raft_index} is recorded as seq {stored.seq}, not {expected_seq}"
            )
        return stored

    def _signer_for(self, key_id: str | None) -> AuditSigner:
        signer = self._signers.get(key_id) if key_id is not None else None
        if signer is None:
            raise AuditKeyError(
                f"the log's current audit key {key_id} is not among this store's signers"
                if key_id
                else "no audit signer configured; the store is read-only"
            )
        return signer

    def _write_genesis(self, head: LogHead) -> LogHead:
        signer = self._first_signer
        if signer is None:
            raise AuditKeyError("no audit signer configured; cannot create the genesis entry")
        payload = {
            **self._genesis_info,
            "alg": ALGORITHM,
            "public_key": signer.public_key_hex,
            "key_id": signer.key_id,
        }
        head.key_id, head.public_key = signer.key_id, signer.public_key
        self._write(head, GENESIS, payload, canonical_text(payload), GENESIS_RAFT_INDEX, None)
        assert self._head is not None
        return self._head

    def _write(
        self,
        head: LogHead,
        kind: str,
        payload: dict[str, Any],
        body: str,
        raft_index: int,
        next_signer: AuditSigner | None,
    ) -> Entry:
        """Sign a new entry at the head and store it."""
        signer = self._signer_for(head.key_id)
        seq = head.size
        entry_hash = compute_entry_hash(
            seq, kind, payload, raft_index, head.head_hash, signer.key_id
        )
        signature = signer.sign(ENTRY_CONTEXT + bytes.fromhex(entry_hash)).hex()
        entry = Entry(
            seq, kind, payload, raft_index, head.head_hash, entry_hash, signer.key_id, signature
        )
        after = next_signer or signer  # key in force once this entry is in the log
        self._insert(head, entry, body, after.key_id, after.public_key)
        return entry

    def _insert(
        self, head: LogHead, entry: Entry, body: str, key_id: str, public_key: bytes
    ) -> None:
        """Store ``entry`` (and the checkpoint it completes) in one transaction.

        ``key_id``/``public_key`` name the key in force after the entry; it signs the
        checkpoint. Without that key's signer the checkpoint is skipped (an importing node
        that cannot sign); verification does not need checkpoints at fixed sizes.
        """
        acc = head.acc.copy()
        acc.append(bytes.fromhex(entry.entry_hash))
        checkpoint = None
        cp_signer = self._signers.get(key_id)
        if acc.size % self.checkpoint_every == 0 and cp_signer is not None:
            root = acc.root().hex()
            cp_sig = cp_signer.sign(checkpoint_message(acc.size, root, key_id)).hex()
            checkpoint = Checkpoint(acc.size, root, key_id, cp_sig)
        insert_entry(self.engine, entry, body, checkpoint)
        self._head = LogHead(entry.seq + 1, entry.entry_hash, entry.raft_index, key_id,
                           public_key, acc)

    def import_entries(self, entries: Iterable[Entry]) -> int:
        """Copy entries signed elsewhere (a peer's log or an export) onto this log.

        For a node that joined late or restored from a Raft snapshot: the commands before
        the snapshot never reach its ``append``, so it copies the peer's entries instead and
        then appends as usual. Each entry must extend this log exactly (seq, prev_hash,
        rising raft index, recomputed hash, signature by the key in force); entries already
        present must be identical. Raises AuditIntegrityError at the first entry that does
        not fit, after keeping the ones before it. Returns the number written.
        """
        checker = SignatureChecker()
        written = 0
        with self._lock:
            head = self._load_head()
            for entry in entries:
                if entry.seq < head.size:
                    stored = self.get(entry.seq)
                    if stored is None or stored.entry_hash != entry.entry_hash:
                        raise AuditConflictError(
                            f"seq {entry.seq} differs from this node's entry; the logs diverge"
                        )
                    continue
                problem, key = self._extension_problem(head, entry, checker)
                if problem is not None:
                    raise AuditIntegrityError(f"cannot import seq {entry.seq}: {problem}")
                assert key is not None
                self._insert(head, entry, canonical_text(entry.payload), key_id_for(key), key)
                head = self._load_head()
                written += 1
        return written

    def _extension_problem(
        self, head: LogHead, entry: Entry, checker: SignatureChecker
    ) -> tuple[str | None, bytes | None]:
        """Why ``entry`` cannot follow ``head`` (or None), and the key in force after it."""
        if entry.seq != head.size:
            return f"expected seq {head.size}", None
        if entry.prev_hash != head.head_hash:
            return "prev_hash does not match this log's head", None
        if type(entry.raft_index) is not int or entry.raft_index <= head.last_raft:
            return "raft_index does not increase", None
        try:
            recomputed = compute_entry_hash(entry.seq, entry.kind, entry.payload,
                                            entry.raft_index, entry.prev_hash, entry.key_id)
        except (CanonicalError, TypeError) as exc:
            return f"payload has no canonical encoding: {exc}", None
        if recomputed != entry.entry_hash:
            return "entry_hash does not match its contents", None
        key, after = head.public_key, head.public_key
        if entry.kind in KEY_KINDS or entry.seq == 0:
            if (entry.seq == 0) != (entry.kind == GENESIS):
                return "only the first entry is a genesis entry", None
            try:
                validate_payload(entry.kind, entry.payload)
                introduced = parse_public_key(entry.payload["public_key"])
            except (PayloadError, ValueError) as exc:
                return f"unusable key entry: {exc}", None
            if entry.seq == 0:
                own = self._first_signer
                if own is not None and own.public_key != introduced:
                    return "genesis key is not this node's audit key", None
                key = introduced
            after = introduced
        if key is None or entry.key_id != key_id_for(key):
            return "not signed by the key in force", None
        try:
            signature = bytes.fromhex(entry.signature)
        except ValueError:
            return "signature is not hex", None
        if not checker.check(key, signature, ENTRY_CONTEXT + bytes.fromhex(entry.entry_hash)):
            return "signature is not valid", None
        return None, after

    def _load_head(self) -> LogHead:
        """Read what a writer needs once, and refuse to extend a visibly damaged log."""
        if self._head is None:
            self._head = read_head(self.engine, self._first_signer)
        return self._head

    def damage(self) -> str | None:
        """Why the stored log no longer extends what this store wrote, or None (cheap)."""
        with self._lock:
            head = self._load_head()
            return tail_problem(self.engine, head.size, head.head_hash)

    # --- reading ---------------------------------------------------------------------------

    def _select(self, *where: Any) -> list[Entry]:
        query = select(entries_table).where(*where).order_by(_E.seq)
        with self.engine.connect() as conn:
            return [entry_from_row(r) for r in conn.execute(query)]

    def __len__(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(entries_table)).scalar_one())

    def head(self) -> Entry | None:
        """The newest entry."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(entries_table).order_by(_E.seq.desc()).limit(1)
            ).first()
        return entry_from_row(row) if row is not None else None

    def get(self, seq: int) -> Entry | None:
        """The entry at ``seq``."""
        found = self._select(_E.seq == seq)
        return found[0] if found else None

    def get_by_raft_index(self, raft_index: int) -> Entry | None:
        """The entry written for the Raft command at ``raft_index``."""
        found = self._select(_E.raft_index == raft_index)
        return found[0] if found else None

    def entries_after_raft_index(self, raft_index: int, limit: int) -> list[Entry]:
        """Up to `limit` entries for commands after `raft_index`, in log order: what a peer
        that took a snapshot copies (`AuditWriter`'s catch-up)."""
        query = (select(entries_table).where(_E.raft_index > raft_index).order_by(_E.seq)
                 .limit(limit))
        with self.engine.connect() as conn:
            return [entry_from_row(r) for r in conn.execute(query)]

    def iter_entries(self, start: int = 0, batch: int = 2000) -> Iterator[Entry]:
        """All entries from seq ``start`` in seq order, fetched in batches."""
        last = start - 1
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(entries_table).where(_E.seq > last).order_by(_E.seq).limit(batch)
                ).all()
            for row in rows:
                yield entry_from_row(row)
            if len(rows) < batch:
                return
            last = int(rows[-1].seq)

    def entries(self, start: int = 0, stop: int | None = None) -> list[Entry]:
        """Entries with start <= seq < stop, in seq order."""
        where: list[ColumnElement[bool]] = [_E.seq >= start]
        if stop is not None:
            where.append(_E.seq < stop)
        return self._select(*where)

    def checkpoints(self) -> list[Checkpoint]:
        """All signed checkpoints, by tree size."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(checkpoints_table).order_by(checkpoints_table.c.tree_size)
            ).all()
        return [Checkpoint(int(r.tree_size), r.root_hash, r.key_id, r.signature) for r in rows]

    def rounds(
        self, since: int | None = None, until: int | None = None, site: str | None = None
    ) -> list[RoundView]:
        """Rounds in [since, until] (inclusive) that ``site`` took part in, by round number."""
        where: list[ColumnElement[bool]] = [_E.kind.in_(ROUND_KINDS)]
        if since is not None:
            where.append(_E.round >= since)
        if until is not None:
            where.append(_E.round <= until)
        return select_rounds(self._select(*where), since, until, site)

    def round(self, number: int) -> RoundView | None:
        """Every attempt at round ``number``, or None if it never opened."""
        return group_rounds(self._select(_E.kind.in_(ROUND_KINDS), _E.round == number)).get(
            number
        )

    def lineage(self, version: str) -> list[Entry]:
        """Entries from model ``version`` (or a unique prefix) back to model genesis."""
        return lineage(self._select(_E.kind.in_(MODEL_KINDS)), version)

    def spend(self) -> dict[str, SpendSeries]:
        """Cumulative recorded epsilon per site by round, with each site's budget."""
        kinds = (CLIENT_ENROLLED, BUDGET_CHANGED, ROUND_COMMITTED, ROUND_ABORTED, CHARGE_RECORDED)
        return privacy_spend(self._select(_E.kind.in_(kinds)))

    def keys(self) -> list[KeyInForce]:
        """The audit keys as the log introduces them (genesis, then rotations)."""
        out = []
        for e in self._select(_E.kind.in_(KEY_KINDS)):
            start = e.seq if e.kind == GENESIS else e.seq + 1
            out.append(KeyInForce(str(e.payload.get("key_id")),
                                  str(e.payload.get("public_key")), start))
        return out

    # --- verification and export -----------------------------------------------------------

    def verify(self, **options: Any) -> VerifyReport:
        """Verify the stored log; options are those of ``verify.verify_log``.

        Also checks that the indexed copies of ``round``/``version`` agree with the payloads,
        since the query commands trust them.
        """
        # Checkpoints first: the log only grows, so every checkpoint read now is covered by
        # the entries read next, even while a node keeps appending.
        checkpoints = self.checkpoints()
        entries: list[Entry] = []
        extra: list[Issue] = []
        with self.engine.connect() as conn:
            for row in conn.execute(select(entries_table).order_by(_E.seq)):
                entry = entry_from_row(row)
                entries.append(entry)
                want_round, want_version = indexed_columns(entry)
                if row.round != want_round or row.version != want_version:
                    extra.append(Issue("index", "indexed round/version columns disagree with"
                                       " the payload", entry.seq))
        return verify_log(entries, checkpoints, extra_issues=extra, **options)

    def export(self, directory: str | Path) -> dict[str, Any]:
        """Write an offline bundle (see ``bundle``); returns its manifest."""
        checkpoints = self.checkpoints()  # before the entries, as in ``verify``
        return bundle_mod.export_bundle(
            self.iter_entries(), checkpoints, Path(directory), source=self.describe()
        )


def open_readonly(url: str, schema: str | None = None) -> AuditStore:
    """Open an existing log for reading only: no migrations, no signer."""
    return AuditStore(url, schema=schema, migrate=False)


__all__ = [
    "AuditConflictError",
    "AuditError",
    "AuditGapError",
    "AuditIntegrityError",
    "AuditOrderError",
    "AuditSchemaError",
    "AuditStore",
    "make_engine",
    "open_readonly",
    "upgrade_schema",
]
