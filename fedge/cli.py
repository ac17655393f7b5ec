"""The ``fedge`` command: mounts each package's own command group.

Every failure fedge expects (bad flags, bad values, missing data) ends with one
line on stderr and a non-zero exit code, never a traceback.

Each group is mounted lazily (:data:`MOUNTS`): its module, and with it torch,
Flower or ONNX Runtime, is imported only when a command of that group runs, so
``fedge --help`` and ``fedge version`` start at once. The root listing shows the
help text recorded here (a test keeps it equal to the group's own). To mount a
new group, add a :class:`Mount`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NoReturn

import click
import typer
from typer.core import TyperGroup

from fedge.errors import FedgeError
from fedge.home import HOME_ENV, HOME_HELP
from fedge.version import code_version

__all__ = ["MOUNTS", "Mount", "app", "main"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Mount:
    """A command group imported on first use: ``module.attribute`` is a ``typer.Typer``."""

    module: str
    attribute: str
    help: str


MOUNTS: Mapping[str, Mount] = {
    "server": Mount(
        module="fl_server.deploy_cli",
        attribute="server_app",
        help="Run a fedge deployment: init, start, enrolment tokens, devices.",
    ),
    "sim": Mount(
        module="simulations.cli",
        attribute="app",
        help="Run simulated federations on Flower's simulation engine (Ray).",
    ),
    "audit": Mount(
        module="fl_server.cli",
        attribute="audit_app",
        help="Read and verify the tamper-evident audit log.",
    ),
    "ledger": Mount(
        module="fl_server.cli",
        attribute="ledger_app",
        help="Show what each run spent of its privacy budget.",
    ),
    "store": Mount(
        module="fl_server.store.cli",
        attribute="store_app",
        help="The model store: signed, versioned global models and their artefacts.",
    ),
    "rollout": Mount(
        module="fl_server.rollout.cli",
        attribute="rollout_app",
        help="Canary rollouts of signed model versions: stages, health gates, rollback.",
    ),
    "client": Mount(
        module="fl_client.cli",
        attribute="client_app",
        help="An edge device: enrol, start, its verified model cache and local inference.",
    ),
    "edge": Mount(
        module="edge_runtime.cli",
        attribute="edge_app",
        help="Device-side tools: benchmark models on this machine's providers.",
    ),
}


def load_group(name: str) -> click.Command:
    """Import the group mounted as ``name`` and return its click command."""
    mount = MOUNTS[name]
    sub_app = getattr(importlib.import_module(mount.module), mount.attribute)
    group = typer.main.get_group(sub_app)
    group.name = name
    return group


class _LazyGroup(TyperGroup):
    """The root group: lists the mounts from :data:`MOUNTS`, imports one when it runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*MOUNTS, *(name for name in self.commands if name not in MOUNTS)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        loaded = self.commands.get(cmd_name)
        if loaded is not None or cmd_name not in MOUNTS:
            return loaded
        # Listed in help without importing it: a stand-in with the recorded help.
        return click.Command(cmd_name, help=MOUNTS[cmd_name].help)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] in MOUNTS and args[0] not in self.commands:
            self.add_command(load_group(args[0]), args[0])
        try:
            # Not Typer's override: it adds a second "Did you mean" to click's own.
            return click.Group.resolve_command(self, ctx, args)
        except click.exceptions.NoSuchCommand as exc:
            # Suggest among every mount, not only the groups already imported.
            raise click.exceptions.NoSuchCommand(
                exc.command_name, possibilities=self.list_commands(ctx), ctx=exc.ctx
            ) from None


app = typer.Typer(
    name="fedge",
    help="fedge: privacy-centred federated learning for edge fleets, built on Flower.",
    cls=_LazyGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def root_callback(
    home: Annotated[Path | None, typer.Option("--home", help=HOME_HELP)] = None,
) -> None:
    """fedge: privacy-centred federated learning for edge fleets, built on Flower."""
    if home is not None:
        # Every command (and a simulation's worker processes) resolves the home
        # from the environment; a command's own --home still wins.
        os.environ[HOME_ENV] = str(home)


EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


@app.command("version")
def version_command() -> None:
    """Print the fedge version (with the git commit when run from a checkout)."""
    typer.echo(f"fedge {code_version()}")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (``FEDGE_LOG_FORMAT=json``)."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line of JSON."""
        import json

        document = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            document["error"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


def _configure_logging() -> None:
    level_name = os.environ.get("FEDGE_LOG_LEVEL", "WARNING").upper()
    level = logging.getLevelNamesMapping().get(level_name, logging.WARNING)
    handler: logging.Handler
    if os.environ.get("FEDGE_LOG_FORMAT", "").lower() == "json":
        # For log shippers (Loki, CloudWatch, ...): machine-readable lines on stderr.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonLogFormatter())
    else:
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def _error(message: str) -> None:
    sys.stderr.write(f"fedge: error: {message}\n")


def _exit_now(status: int) -> NoReturn:
    # Flower's simulation runs the ServerApp on a non-daemon thread that can sit
    # in a round's wait for minutes; a normal exit would wait for it. Everything
    # a run must keep (summary, checkpoints, audit events) is already on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _help_hint(exc: click.UsageError) -> str:
    return f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    _configure_logging()
    saved_home = os.environ.get(HOME_ENV)
    try:
        result = app(
            args=list(argv) if argv is not None else None,
            prog_name="fedge",
            standalone_mode=False,
        )
    except click.exceptions.NoArgsIsHelpError:
        return EXIT_USAGE
    except click.exceptions.NoSuchCommand as exc:
        # Typer adds "Did you mean" to the message and click again when formatting.
        clean = click.exceptions.NoSuchCommand(
            exc.command_name, possibilities=exc.possibilities, ctx=exc.ctx
        )
        _error(f"{clean.format_message()}{_help_hint(exc)}")
        return EXIT_USAGE
    except click.UsageError as exc:
        _error(f"{exc.format_message()}{_help_hint(exc)}")
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
    finally:
        _restore_env(HOME_ENV, saved_home)
    if result == EXIT_INTERRUPTED:
        # Typer turns Ctrl-C into a plain exit status of 130.
        _error("interrupted")
        _exit_now(EXIT_INTERRUPTED)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
