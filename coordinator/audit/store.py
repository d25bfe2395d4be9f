"""The SQL shell around the audit core: append, read, and verify a log in SQLite or PostgreSQL.

Each coordinator node owns one ``AuditStore`` (SQLite file by default, PostgreSQL in
production) and calls ``append`` for every applied Raft command that the audit trail records.
Appends are idempotent on the Raft index, so replaying the Raft log after a restart writes
nothing twice, and deterministic (Ed25519 signs deterministically), so all nodes holding the
cluster audit key produce the same entries hash for hash.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql.elements import ColumnElement

from coordinator.audit import bundle as bundle_mod
from coordinator.audit.canonical import CanonicalError, canonical_text, normalize
from coordinator.audit.entry import (
    BUDGET_CHANGED,
    CHARGE_RECORDED,
    CLIENT_ENROLLED,
    ENTRY_CONTEXT,
    GENESIS,
    GENESIS_PREV_HASH,
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
from coordinator.audit.keys import (
    ALGORITHM,
    AuditKeyError,
    AuditSigner,
    SignatureChecker,
    key_id_for,
    parse_public_key,
)
from coordinator.audit.merkle import MerkleAccumulator
from coordinator.audit.query import (
    RoundView,
    SpendSeries,
    group_rounds,
    lineage,
    privacy_spend,
    select_rounds,
)
from coordinator.audit.verify import Issue, KeyInForce, VerifyReport, verify_log

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
DEFAULT_CHECKPOINT_EVERY = 256
_SCHEMA_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_CORRUPT = "$unparseable_payload"

metadata = MetaData()
# Mirrors migrations/versions/0001_audit_log.py; used for queries, never for DDL.
entries_table = Table(
    "audit_entries",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("raft_index", BigInteger, nullable=False),
    Column("kind", String(64), nullable=False),
    Column("round", BigInteger),
    Column("version", String(64)),
    Column("payload", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("entry_hash", String(64), nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("signature", String(128), nullable=False),
)
checkpoints_table = Table(
    "audit_checkpoints",
    metadata,
    Column("tree_size", BigInteger, primary_key=True, autoincrement=False),
    Column("root_hash", String(64), nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("signature", String(128), nullable=False),
)
_E = entries_table.c
_INSERT_ENTRY = entries_table.insert()
_INSERT_CHECKPOINT = checkpoints_table.insert()


class AuditError(RuntimeError):
    """Base class for audit store failures."""


class AuditConflictError(AuditError):
    """The Raft index is already recorded with a different kind or payload."""


class AuditOrderError(AuditError):
    """A Raft index below the newest recorded one that was never recorded: a skipped command."""


class AuditGapError(AuditOrderError):
    """The entry would not land at the seq the replicated state expects: entries missing."""


class AuditIntegrityError(AuditError):
    """The stored log is damaged; the store refuses to extend it."""


class AuditSchemaError(AuditError):
    """The database has no audit schema (opened without migrating)."""


@dataclass(slots=True)
class _Head:
    """What a writer needs to extend the log without reading it back."""

    size: int
    head_hash: str
    last_raft: int
    key_id: str | None
    public_key: bytes | None
    acc: MerkleAccumulator


def redact_url(url: str) -> str:
    """The URL without its password, safe to print and to write into an export manifest."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str, schema: str | None = None, *, writer: bool = True) -> Engine:
    """Engine with the settings the audit log relies on.

    SQLite runs in WAL mode so an auditor can read while the node writes; synchronous=NORMAL
    may lose the newest entries on power loss, which a Raft replay rewrites idempotently.
    For PostgreSQL, ``schema`` selects (via search_path) the schema holding the tables.
    A reader (``writer=False``) leaves the journal mode alone, so it works on a read-only
    copy of the file.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        memory = parsed.database in (None, "", ":memory:")
        options: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
        if memory:
            options["poolclass"] = StaticPool
        engine = create_engine(parsed, **options)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=10000")
            if writer and not memory:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    if backend == "postgresql":
        connect_args: dict[str, Any] = {"connect_timeout": 5}
        if schema is not None:
            if not _SCHEMA_RE.match(schema):
                raise ValueError(f"invalid schema name {schema!r}")
            connect_args["options"] = f"-csearch_path={schema}"
        return create_engine(parsed, connect_args=connect_args, pool_pre_ping=True)
    return create_engine(parsed)


def upgrade_schema(connection: Connection) -> None:
    """Run the audit migrations to head on ``connection`` (Alembic, no ini file)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


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
        self._head: _Head | None = None
        self.engine = make_engine(url, schema, writer=migrate)
        try:
            if schema is not None and self.engine.dialect.name == "postgresql":
                with self.engine.begin() as conn:
                    conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            if migrate:
                with self.engine.begin() as conn:
                    upgrade_schema(conn)
            elif not inspect(self.engine).has_table("audit_entries"):
                raise AuditSchemaError(f"{redact_url(url)} holds no audit log")
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

    def _write_genesis(self, head: _Head) -> _Head:
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
        head: _Head,
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
        self, head: _Head, entry: Entry, body: str, key_id: str, public_key: bytes
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
        kind, payload = entry.kind, entry.payload
        rnd = payload.get("round") if kind in ROUND_KINDS else None
        version = payload.get("version") if kind in MODEL_KINDS else None
        row = {
            "seq": entry.seq,
            "raft_index": entry.raft_index,
            "kind": kind,
            "round": rnd if type(rnd) is int else None,
            "version": version if isinstance(version, str) else None,
            "payload": body,
            "prev_hash": entry.prev_hash,
            "entry_hash": entry.entry_hash,
            "key_id": entry.key_id,
            "signature": entry.signature,
        }
        with self.engine.begin() as conn:
            conn.execute(_INSERT_ENTRY, row)
            if checkpoint is not None:
                conn.execute(_INSERT_CHECKPOINT, checkpoint.to_dict())
        self._head = _Head(entry.seq + 1, entry.entry_hash, entry.raft_index, key_id,
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
        self, head: _Head, entry: Entry, checker: SignatureChecker
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

    def _load_head(self) -> _Head:
        """Read what a writer needs once, and refuse to extend a visibly damaged log."""
        if self._head is not None:
            return self._head
        acc = MerkleAccumulator()
        head_hash, last_raft = GENESIS_PREV_HASH, GENESIS_RAFT_INDEX - 1
        with self.engine.connect() as conn:
            latest = conn.execute(
                select(checkpoints_table).order_by(checkpoints_table.c.tree_size.desc()).limit(1)
            ).first()
            root_at_latest: str | None = None
            rows = conn.execute(
                select(_E.seq, _E.entry_hash, _E.raft_index).order_by(_E.seq)
            )
            for seq, entry_hash, raft_index in rows:
                if seq != acc.size or entry_hash is None or len(entry_hash) != 64:
                    raise AuditIntegrityError(
                        f"audit log is damaged at seq {acc.size}; run `fedraft audit verify`"
                    )
                acc.append(bytes.fromhex(entry_hash))
                head_hash, last_raft = entry_hash, raft_index
                if latest is not None and acc.size == latest.tree_size:
                    root_at_latest = acc.root().hex()
            key_rows = conn.execute(
                select(_E.payload).where(_E.kind.in_(KEY_KINDS)).order_by(_E.seq)
            ).all()
        if latest is not None and root_at_latest != latest.root_hash:
            raise AuditIntegrityError(
                f"audit log does not match its checkpoint at tree size {latest.tree_size};"
                " run `fedraft audit verify`"
            )
        key_id: str | None = None
        public_key: bytes | None = None
        if key_rows:
            try:
                info = json.loads(key_rows[-1].payload)
                public_key = parse_public_key(info["public_key"])
                key_id = info["key_id"]
            except (ValueError, KeyError, TypeError) as exc:
                raise AuditIntegrityError(f"unreadable audit key entry: {exc}") from exc
        elif self._first_signer is not None:
            key_id, public_key = self._first_signer.key_id, self._first_signer.public_key
        self._head = _Head(acc.size, head_hash, last_raft, key_id, public_key, acc)
        return self._head

    # --- reading ---------------------------------------------------------------------------

    @staticmethod
    def _entry(row: Any) -> Entry:
        try:
            payload = json.loads(row.payload)
            if not isinstance(payload, dict):
                raise ValueError("payload is not an object")
        except ValueError:
            # A damaged row must still reach the verifier, which then names its seq.
            payload = {_CORRUPT: row.payload}
        return Entry(
            seq=int(row.seq),
            kind=row.kind,
            payload=payload,
            raft_index=int(row.raft_index),
            prev_hash=row.prev_hash,
            entry_hash=row.entry_hash,
            key_id=row.key_id,
            signature=row.signature,
        )

    def _select(self, *where: Any) -> list[Entry]:
        query = select(entries_table).where(*where).order_by(_E.seq)
        with self.engine.connect() as conn:
            return [self._entry(r) for r in conn.execute(query)]

    def __len__(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(entries_table)).scalar_one())

    def head(self) -> Entry | None:
        """The newest entry."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(entries_table).order_by(_E.seq.desc()).limit(1)
            ).first()
        return self._entry(row) if row is not None else None

    def get(self, seq: int) -> Entry | None:
        """The entry at ``seq``."""
        found = self._select(_E.seq == seq)
        return found[0] if found else None

    def get_by_raft_index(self, raft_index: int) -> Entry | None:
        """The entry written for the Raft command at ``raft_index``."""
        found = self._select(_E.raft_index == raft_index)
        return found[0] if found else None

    def iter_entries(self, start: int = 0, batch: int = 2000) -> Iterator[Entry]:
        """All entries from seq ``start`` in seq order, fetched in batches."""
        last = start - 1
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(entries_table).where(_E.seq > last).order_by(_E.seq).limit(batch)
                ).all()
            for row in rows:
                yield self._entry(row)
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
                entry = self._entry(row)
                entries.append(entry)
                p = entry.payload
                rnd = p.get("round") if entry.kind in ROUND_KINDS else None
                ver = p.get("version") if entry.kind in MODEL_KINDS else None
                want_round = rnd if type(rnd) is int else None
                want_version = ver if isinstance(ver, str) else None
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
