"""The ``fedge`` command: mounts each package's own command group.

Every failure fedge expects (bad flags, bad values, missing data) ends with one
line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import click
import typer
from rich.logging import RichHandler

from edge_runtime.cli import edge_app
from fedge.errors import FedgeError
from fedge.version import code_version
from fl_client.cli import client_app
from fl_server.cli import audit_app, ledger_app
from fl_server.store.cli import store_app
from simulations.cli import app as sim_app

__all__ = ["app", "main"]

app = typer.Typer(
    name="fedge",
    help="fedge: privacy-centred federated learning for edge fleets, built on Flower.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(sim_app, name="sim")
app.add_typer(audit_app, name="audit")
app.add_typer(ledger_app, name="ledger")
app.add_typer(store_app, name="store")
app.add_typer(client_app, name="client")
app.add_typer(edge_app, name="edge")

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


@app.command("version")
def version_command() -> None:
    """Print the fedge version (with the git commit when run from a checkout)."""
    typer.echo(f"fedge {code_version()}")


def _configure_logging() -> None:
    level_name = os.environ.get("FEDGE_LOG_LEVEL", "WARNING").upper()
    level = logging.getLevelNamesMapping().get(level_name, logging.WARNING)
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
    )


def _error(message: str) -> None:
    sys.stderr.write(f"fedge: error: {message}\n")


def _exit_now(status: int) -> NoReturn:
    # Flower's simulation runs the ServerApp on a non-daemon thread that can sit
    # in a round's wait for minutes; a normal exit would wait for it. Everything
    # a run must keep (summary, checkpoints, audit events) is already on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    _configure_logging()
    try:
        result = app(
            args=list(argv) if argv is not None else None,
            prog_name="fedge",
            standalone_mode=False,
        )
    except click.exceptions.NoArgsIsHelpError:
        return EXIT_USAGE
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _error(f"{exc.format_message()}{hint}")
        return EXIT_USAGE
    except click.ClickException as exc:
        _error(exc.format_message())
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        _error("interrupted")
        _exit_now(EXIT_INTERRUPTED)
    except FedgeError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    if result == EXIT_INTERRUPTED:
        # Typer turns Ctrl-C into a plain exit status of 130.
        _error("interrupted")
        _exit_now(EXIT_INTERRUPTED)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
