"""Alembic environment: runs migrations on the connection fedge hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from fl_server.db.schema import Base

# Serialises concurrent upgrades of one PostgreSQL database (several servers or
# tests starting at once); SQLite serialises writers by itself.
_PG_MIGRATION_LOCK = 0x66656467


def _run(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


_connection = context.config.attributes.get("connection")
if not isinstance(_connection, Connection):
    raise RuntimeError("fedge migrations run only through fl_server.db.open_database")
_run(_connection)
