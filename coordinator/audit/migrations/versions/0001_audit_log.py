"""Audit log: entries, checkpoints, and append-only triggers.

Revision ID: 0001_audit_log
Revises:
Create Date: 2025-11-23

The payload column is TEXT holding the canonical JSON verbatim. JSON/JSONB would reorder
keys and respell numbers, and the hashes cover exact bytes. ``round`` and ``version`` are
copies of payload fields for indexed queries only; verification never trusts them.

Triggers reject UPDATE, DELETE and (PostgreSQL) TRUNCATE so that a bug or a careless
operator cannot rewrite history through the normal path. They are a guard rail, not the
security: a database superuser can disable them, and verification catches what they did.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_audit_log"
down_revision = None
branch_labels = None
depends_on = None

TABLES = ("audit_entries", "audit_checkpoints")

PG_FUNCTION = """
CREATE FUNCTION fedraft_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'fedraft audit log is append-only: % on % rejected', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$
"""


def upgrade() -> None:
    op.create_table(
        "audit_entries",
        sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("raft_index", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("round", sa.BigInteger(), nullable=True),
        sa.Column("version", sa.String(64), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("entry_hash", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.UniqueConstraint("raft_index", name="uq_audit_entries_raft_index"),
    )
    op.create_index("ix_audit_entries_kind_round", "audit_entries", ["kind", "round"])
    op.create_index("ix_audit_entries_version", "audit_entries", ["version"])
    op.create_table(
        "audit_checkpoints",
        sa.Column("tree_size", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("root_hash", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
    )

    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(PG_FUNCTION)
        for table in TABLES:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION fedraft_audit_append_only()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION fedraft_audit_append_only()"
            )
    elif dialect == "sqlite":
        # SQLite has no TRUNCATE; its "DELETE FROM t" fast path is off when triggers exist.
        for table in TABLES:
            for action in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, 'fedraft audit log is append-only: {action} "
                    f"on {table} rejected'); END"
                )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for table in TABLES:
            for action in ("update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{action}")
    op.drop_table("audit_checkpoints")
    op.drop_index("ix_audit_entries_version", table_name="audit_entries")
    op.drop_index("ix_audit_entries_kind_round", table_name="audit_entries")
    op.drop_table("audit_entries")
    if dialect == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS fedraft_audit_append_only()")
