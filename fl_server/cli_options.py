"""Options and helpers the server-side commands share (audit, ledger, reports, store, rollout)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedge.home import HOME_HELP, FedgeHome
from fl_server.db import DB_URL_ENV

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = [
    "STORE_DIR_ENV",
    "DbUrlOption",
    "HomeOption",
    "JsonOption",
    "StoreDirOption",
    "open_existing",
]

STORE_DIR_ENV = "FEDGE_STORE_DIR"

DbUrlOption = Annotated[
    str | None,
    typer.Option(
        "--db-url", envvar=DB_URL_ENV, help="The database (default: HOME/fedge.db, SQLite)."
    ),
]
StoreDirOption = Annotated[
    Path | None,
    typer.Option(
        "--store-dir",
        envvar=STORE_DIR_ENV,
        help="Where the store's objects and signing key live (default: HOME/store).",
    ),
]
HomeOption = Annotated[Path | None, typer.Option("--home", help=HOME_HELP)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def open_existing(db_url: str | None, home: Path | None) -> Engine:
    """Open the database ``db_url`` (else the home's) for reading; never create one.

    Raises
    ------
    StorageError
        If there is no fedge database there.
    """
    from fl_server.db import open_database

    return open_database(db_url or FedgeHome.resolve(home).db_url, create=False)
