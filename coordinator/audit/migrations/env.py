"""Alembic environment for the audit log schema.

``AuditStore`` runs these migrations itself (``upgrade head`` on open) by putting an open
connection in ``config.attributes["connection"]``; no alembic.ini is needed at run time. The
alembic CLI also works with an ini file that sets ``script_location`` to this directory and
``sqlalchemy.url``. The audit schema keeps its own version table so it can share a database
with other migrated schemas.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool
from sqlalchemy.engine import Connection

VERSION_TABLE = "audit_alembic_version"

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=None,
        version_table=VERSION_TABLE,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade head --sql``) for DBAs who apply it by hand."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=None,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate through the caller's connection, or one made from the ini file's URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with engine.connect() as conn:
        _run(conn)
        conn.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
