"""The fedge cloud database: engine creation and schema migrations.

SQLite (a file) by default, PostgreSQL through psycopg 3 when the URL says so.
"""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from fedge.errors import ConfigError, StorageError

__all__ = ["DB_URL_ENV", "DEFAULT_DB_URL", "open_database", "resolve_db_url"]

DB_URL_ENV = "FEDGE_DB_URL"
DEFAULT_DB_URL = "sqlite:///runs/fedge.db"
_SQLITE_BUSY_TIMEOUT_MS = 30_000


def resolve_db_url(explicit: str | None = None) -> str:
    """Return ``explicit``, else ``$FEDGE_DB_URL``, else a SQLite file under ``runs/``."""
    if explicit:
        return explicit
    return os.environ.get(DB_URL_ENV) or DEFAULT_DB_URL


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: object, _record: object) -> None:
        cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


def open_database(url: str | None = None, *, create: bool = True) -> Engine:
    """Create an engine for ``url`` and upgrade its schema to the newest migration.

    Parameters
    ----------
    url
        A SQLAlchemy URL (``sqlite:///path.db``, ``postgresql+psycopg://...``);
        ``None`` resolves it with :func:`resolve_db_url`. A SQLite file's parent
        directory is created.
    create
        ``False`` for readers: a database that does not exist yet (no SQLite
        file, or no fedge schema in it) is an error instead of being created,
        and no directory is made.

    Raises
    ------
    ConfigError
        If the URL cannot be parsed.
    StorageError
        If the database cannot be reached or migrated, or, with ``create=False``,
        does not exist.
    """
    resolved = resolve_db_url(url)
    try:
        parsed = make_url(resolved)
    except ArgumentError as exc:
        raise ConfigError(f"invalid database URL {resolved!r}: {exc}") from exc
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    is_sqlite = parsed.get_backend_name() == "sqlite"
    shown = parsed.render_as_string(hide_password=True)
    missing = StorageError(
        f"no fedge database at {shown}; run `fedge server init` or `fedge sim run` first"
    )
    if is_sqlite and parsed.database not in (None, "", ":memory:"):
        if not create and not Path(parsed.database).is_file():
            raise missing
        if create:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(parsed, pool_pre_ping=not is_sqlite)
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(f"unsupported database URL {parsed.render_as_string()}: {exc}") from exc
    if is_sqlite:
        _configure_sqlite(engine)
    config = Config()
    config.set_main_option("script_location", "fl_server.db:migrations")
    try:
        with engine.begin() as connection:
            if not create and not inspect(connection).has_table("alembic_version"):
                engine.dispose()
                raise missing
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except SQLAlchemyError as exc:
        engine.dispose()
        raise StorageError(f"cannot open database {shown}: {exc}") from exc
    return engine
