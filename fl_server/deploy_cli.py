"""``fedge server``: make a deployment, run it, enrol and revoke devices.

``DIR`` is the deployment directory; it defaults to the fedge home
(``--home``, ``$FEDGE_HOME``, ``~/.fedge``). Every command that only reads
(``nodes``) refuses a directory that ``fedge server init`` did not make.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedge.errors import ConfigError
from fedge.home import HOME_HELP, resolve_home

if TYPE_CHECKING:
    from fl_server.deployment import DeploymentConfig, DeploymentLayout

__all__ = ["server_app"]

server_app = typer.Typer(
    help="Run a fedge deployment: init, start, enrolment tokens, devices.", no_args_is_help=True
)
token_app = typer.Typer(help="One-time enrolment tokens.", no_args_is_help=True)
server_app.add_typer(token_app, name="token")

_Dir = Annotated[
    Path | None,
    typer.Argument(help="The deployment directory (default: the fedge home).", show_default=False),
]
_Home = Annotated[Path | None, typer.Option("--home", help=HOME_HELP)]
_Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _root(directory: Path | None, home: Path | None) -> Path:
    return directory if directory is not None else resolve_home(home)


def _opened(root: Path) -> tuple[DeploymentLayout, DeploymentConfig]:
    from fl_server.deployment import DeploymentLayout, load_config

    layout = DeploymentLayout(root)
    layout.require_initialised()
    return layout, load_config(layout.config)


def parse_duration(text: str) -> timedelta:
    """Return ``30m``, ``24h``, ``7d`` ... as a timedelta (1 s .. 365 d)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"--expires must look like 30m, 24h or 7d, got {text!r}")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if not 0 < seconds <= 365 * 86400:
        raise ConfigError("--expires must be between 1s and 365d")
    return timedelta(seconds=seconds)


@server_app.command("init")
def init_command(
    directory: _Dir = None,
    home: _Home = None,
    san: Annotated[
        list[str] | None,
        typer.Option(
            "--san", help="A name or IP devices reach the server by (repeat; default localhost)."
        ),
    ] = None,
    address: Annotated[
        str, typer.Option("--address", help="Where the gateway listens (host:port).")
    ] = "0.0.0.0:9443",
    database_url: Annotated[
        str,
        typer.Option(
            "--database-url", envvar="FEDGE_DATABASE_URL", help="PostgreSQL URL (default SQLite)."
        ),
    ] = "",
    eval_data: Annotated[
        Path | None,
        typer.Option("--eval-data", help="The server's held-out set (.npz: images, labels)."),
    ] = None,
) -> None:
    """Create a deployment directory: CA and TLS certificate, keys, database, config."""
    from fl_server.deployment_init import ca_fingerprint, init_deployment

    root = _root(directory, home)
    sans = tuple(san) if san else ("localhost", "127.0.0.1")
    layout = init_deployment(
        root, sans=sans, address=address, database_url=database_url, eval_data=eval_data
    )
    typer.echo(f"deployment created in {root}")
    typer.echo(f"  configuration: {layout.config} (edit it, then `fedge server start {root}`)")
    typer.echo(f"  CA fingerprint (devices pin it): {ca_fingerprint(layout.ca_cert.read_bytes())}")
    if eval_data is None:
        typer.echo(
            f"  evaluation set: none yet; `fedge sim samples --count 2000 --out {root}/eval.npz`"
        )


@server_app.command("start")
def start_command(
    directory: _Dir = None,
    home: _Home = None,
    exit_when_done: Annotated[
        bool,
        typer.Option(
            "--exit-when-done",
            help="Exit when the run ends (default: keep serving enrolment, health and "
            "metrics until SIGTERM).",
        ),
    ] = False,
) -> None:
    """Start the SuperLink, the gateway and the coordinator; run the configured federation."""
    import logging

    from fl_server.run_summary import RunSummary
    from fl_server.server_runtime import serve_deployment

    def report(summary: RunSummary) -> None:
        typer.echo(
            f"run {summary.run_id}: {summary.status}, {len(summary.rounds)} rounds, "
            f"final accuracy {summary.final_accuracy}"
        )

    logging.getLogger("fl_server").setLevel(logging.INFO)
    serve_deployment(_root(directory, home), keep_serving=not exit_when_done, on_run_end=report)


@token_app.command("create")
def token_create_command(
    directory: _Dir = None,
    home: _Home = None,
    count: Annotated[int, typer.Option("--count", help="How many tokens (1..10000).")] = 1,
    expires: Annotated[str, typer.Option("--expires", help="Lifetime: 30m, 24h, 7d.")] = "24h",
    as_json: _Json = False,
) -> None:
    """Issue one-time enrolment tokens (printed once; only their hashes are stored)."""
    from fl_server.audit import AuditLog
    from fl_server.db import open_database
    from fl_server.deployment_init import ca_fingerprint
    from fl_server.enrolment.tokens import create_tokens

    layout, config = _opened(_root(directory, home))
    lifetime = parse_duration(expires)
    engine = open_database(layout.database_url(config), create=False)
    try:
        now = datetime.now(UTC)
        tokens = create_tokens(
            engine, count, expires_at=now + lifetime, now=now, audit=AuditLog(engine)
        )
    finally:
        engine.dispose()
    fingerprint = ca_fingerprint(layout.ca_cert.read_bytes())
    if as_json:
        document = {
            "server": config.server.public_url,
            "ca_fingerprint": fingerprint,
            "expires_at": (now + lifetime).isoformat(),
            "tokens": tokens,
        }
        typer.echo(json.dumps(document, indent=2))
        return
    typer.echo(f"# server {config.server.public_url}  ca {fingerprint}")
    typer.echo(f"# expires {(now + lifetime).isoformat(timespec='seconds')}; each works once")
    for token in tokens:
        typer.echo(token)


@server_app.command("nodes")
def nodes_command(directory: _Dir = None, home: _Home = None, as_json: _Json = False) -> None:
    """List the enrolled and revoked devices (read-only)."""
    from fl_server.audit import AuditLog
    from fl_server.db import open_database
    from fl_server.enrolment.registry import DeviceRegistry

    layout, config = _opened(_root(directory, home))
    engine = open_database(layout.database_url(config), create=False)
    try:
        devices = DeviceRegistry(engine, AuditLog(engine)).list()
    finally:
        engine.dispose()
    rows = [
        {
            "device_id": d.device_id,
            "node_id": d.node_id,
            "status": d.status.value,
            "enrolled_at": d.enrolled_at.isoformat(timespec="seconds"),
            "revoked_at": None if d.revoked_at is None else d.revoked_at.isoformat(),
            "reason": d.reason,
        }
        for d in devices
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no devices enrolled")
        return
    for row in rows:
        typer.echo(
            f"{row['device_id']}  node {row['node_id']}  {row['status']}  "
            f"enrolled {row['enrolled_at']}" + (f"  ({row['reason']})" if row["reason"] else "")
        )


@server_app.command("revoke")
def revoke_command(
    device_id: Annotated[str, typer.Argument(help="The device to revoke (dev-...).")],
    directory: Annotated[Path | None, typer.Option("--dir", help="The deployment directory.")] = (
        None
    ),
    home: _Home = None,
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded).")] = "revoked",
) -> None:
    """Revoke a device: the SuperLink refuses it, other devices refuse its certificate."""
    from fl_server.audit import AuditLog
    from fl_server.db import open_database
    from fl_server.enrolment.registry import DeviceRegistry
    from fl_server.superlink import ControlClient, SuperLinkError

    layout, config = _opened(_root(directory, home))
    engine = open_database(layout.database_url(config), create=False)
    try:
        registry = DeviceRegistry(engine, AuditLog(engine))
        device = registry.revoke(device_id, reason, now=datetime.now(UTC))
    finally:
        engine.dispose()
    typer.echo(f"{device_id} revoked")
    if device.node_id is None:
        return
    address = f"127.0.0.1:{config.server.superlink_port}"
    try:
        with ControlClient(address, root_certificates=layout.ca_cert.read_bytes()) as control:
            control.unregister_node(device.node_id)
        typer.echo(f"  node {device.node_id} removed from the SuperLink")
    except SuperLinkError:
        typer.echo(
            "  the SuperLink is not running: its node is removed when `fedge server start` runs"
        )
