"""The SQL layer under ``AuditStore``: tables, engines, migrations, and rows <-> entries.

The tables mirror ``migrations/versions/0001_audit_log.py`` and serve queries only; Alembic
owns the DDL. ``make_engine`` sets what the log relies on (SQLite WAL, a PostgreSQL schema
on the search_path), ``prepare_schema`` migrates or checks the schema when a store opens,
and ``read_head`` reads once what a writer needs to extend the log.
"""

from __future__ import annotations

import json
import re
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
from sqlalchemy.pool import StaticPool

from coordinator.audit.entry import (
    GENESIS_PREV_HASH,
    GENESIS_RAFT_INDEX,
    KEY_KINDS,
    MODEL_KINDS,
    ROUND_KINDS,
    Checkpoint,
    Entry,
)
from coordinator.audit.errors import AuditIntegrityError, AuditSchemaError
from coordinator.audit.keys import AuditSigner, parse_public_key
from coordinator.audit.merkle import MerkleAccumulator

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
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


# --- engines and schema ----------------------------------------------------------------------


def redact_url(url: str) -> str:
    """The URL without its password, safe to print and to write into an export manifest."""
    return make_url(url).render_as_string(hide_password=True)


def check_schema_name(schema: str) -> str:
    """``schema`` if it is a plain SQL identifier (it is spliced into DDL and search_path)."""
    if not _SCHEMA_RE.match(schema):
        raise ValueError(f"invalid schema name {schema!r}")
    return schema


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
            connect_args["options"] = f"-csearch_path={check_schema_name(schema)}"
        return create_engine(parsed, connect_args=connect_args, pool_pre_ping=True)
    return create_engine(parsed)


def upgrade_schema(connection: Connection) -> None:
    """Run the audit migrations to head on ``connection`` (Alembic, no ini file)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def prepare_schema(engine: Engine, url: str, schema: str | None, *, migrate: bool) -> None:
    """Make the audit tables ready on a fresh engine: create the PostgreSQL ``schema`` and
    migrate to head, or (``migrate=False``, no DDL) check that the tables exist."""
    if schema is not None and engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    if migrate:
        with engine.begin() as conn:
            upgrade_schema(conn)
    elif not inspect(engine).has_table("audit_entries"):
        raise AuditSchemaError(f"{redact_url(url)} holds no audit log")


# --- rows and entries ------------------------------------------------------------------------


def indexed_columns(entry: Entry) -> tuple[int | None, str | None]:
    """The ``round`` and ``version`` columns kept beside the payload for queries."""
    kind, payload = entry.kind, entry.payload
    rnd = payload.get("round") if kind in ROUND_KINDS else None
    version = payload.get("version") if kind in MODEL_KINDS else None
    return (rnd if type(rnd) is int else None, version if isinstance(version, str) else None)


def entry_from_row(row: Any) -> Entry:
    """The entry a row of ``audit_entries`` holds."""
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


def insert_entry(engine: Engine, entry: Entry, body: str, checkpoint: Checkpoint | None) -> None:
    """Store ``entry`` with its payload text ``body`` (and ``checkpoint``) in one transaction."""
    rnd, version = indexed_columns(entry)
    row = {
        "seq": entry.seq,
        "raft_index": entry.raft_index,
        "kind": entry.kind,
        "round": rnd,
        "version": version,
        "payload": body,
        "prev_hash": entry.prev_hash,
        "entry_hash": entry.entry_hash,
        "key_id": entry.key_id,
        "signature": entry.signature,
    }
    with engine.begin() as conn:
        conn.execute(_INSERT_ENTRY, row)
        if checkpoint is not None:
            conn.execute(_INSERT_CHECKPOINT, checkpoint.to_dict())


# --- the head a writer extends ---------------------------------------------------------------


@dataclass(slots=True)
class LogHead:
    """What a writer needs to extend the log without reading it back."""

    size: int
    head_hash: str
    last_raft: int
    key_id: str | None
    public_key: bytes | None
    acc: MerkleAccumulator


def read_head(engine: Engine, default_signer: AuditSigner | None) -> LogHead:
    """Read the log's head once, refusing to extend a visibly damaged log.

    The key in force is the one the newest genesis or rotation entry introduces; in an
    empty log it is ``default_signer``'s. Raises AuditIntegrityError on a gap, a malformed
    hash, a mismatch with the newest checkpoint or an unreadable key entry.
    """
    acc = MerkleAccumulator()
    head_hash, last_raft = GENESIS_PREV_HASH, GENESIS_RAFT_INDEX - 1
    with engine.connect() as conn:
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
    key_id, public_key = _key_in_force(key_rows, default_signer)
    return LogHead(acc.size, head_hash, last_raft, key_id, public_key, acc)


def tail_problem(engine: Engine, size: int, head_hash: str) -> str | None:
    """Why the stored log no longer matches the head a writer holds, or None. Two indexed
    reads: for a writer that keeps appending, rows deleted or rewritten behind its back."""
    with engine.connect() as conn:
        count, top = conn.execute(select(func.count(), func.max(_E.seq))).one()
        last = conn.execute(select(_E.entry_hash).where(_E.seq == size - 1)).scalar()
    if count != size or (top if top is not None else -1) != size - 1:
        return (f"it holds {count} entries up to seq {top}, but {size} were written "
                "(entries were deleted)")
    if size and last != head_hash:
        return f"its entry at seq {size - 1} is not the one this node wrote"
    return None


def _key_in_force(
    key_rows: list[Any], default_signer: AuditSigner | None
) -> tuple[str | None, bytes | None]:
    """Key id and public key of the newest key entry, else of ``default_signer``."""
    if key_rows:
        try:
            info = json.loads(key_rows[-1].payload)
            public_key = parse_public_key(info["public_key"])
            return info["key_id"], public_key
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditIntegrityError(f"unreadable audit key entry: {exc}") from exc
    if default_signer is not None:
        return default_signer.key_id, default_signer.public_key
    return None, None


__all__ = [
    "MIGRATIONS_DIR",
    "LogHead",
    "check_schema_name",
    "checkpoints_table",
    "entries_table",
    "entry_from_row",
    "indexed_columns",
    "insert_entry",
    "make_engine",
    "metadata",
    "prepare_schema",
    "read_head",
    "tail_problem",
    "redact_url",
    "upgrade_schema",
]
