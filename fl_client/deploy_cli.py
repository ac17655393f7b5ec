"""``fedge client enroll`` and ``fedge client start``: a real device joins a deployment.

``--dir`` is the device's state directory; it defaults to ``HOME/device`` (the
fedge home: ``--home``, ``$FEDGE_HOME``, ``~/.fedge``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedge.home import HOME_HELP, resolve_home

__all__ = ["enroll_command", "start_command"]

_Dir = Annotated[
    Path | None,
    typer.Option("--dir", help="The device's state directory (default: HOME/device)."),
]
_Home = Annotated[Path | None, typer.Option("--home", help=HOME_HELP)]


def _device_dir(directory: Path | None, home: Path | None) -> Path:
    return directory if directory is not None else resolve_home(home) / "device"


def enroll_command(
    server: Annotated[str, typer.Option("--server", help="The server, https://host:port.")],
    token: Annotated[str, typer.Option("--token", help="A one-time enrolment token.")],
    ca_fingerprint: Annotated[
        str | None,
        typer.Option("--ca-fingerprint", help="sha256:... of the server's CA (from the token)."),
    ] = None,
    ca_cert: Annotated[
        Path | None, typer.Option("--ca-cert", help="The server's CA certificate, if given.")
    ] = None,
    lifetime_epsilon: Annotated[
        float | None,
        typer.Option(
            "--lifetime-epsilon", help="This device's own privacy budget over its whole life."
        ),
    ] = None,
    min_survivors: Annotated[
        int, typer.Option("--min-survivors", help="Unmask only for sums of at least this many.")
    ] = 2,
    directory: _Dir = None,
    home: _Home = None,
) -> None:
    """Enrol this device: make its keys, prove the token, install its round policy."""
    from fl_client.enrolment import PolicyChoices, enrol_device

    target = _device_dir(directory, home)
    record = enrol_device(
        server,
        token,
        target,
        ca_fingerprint=ca_fingerprint,
        ca_cert=ca_cert,
        choices=PolicyChoices(lifetime_epsilon=lifetime_epsilon, min_survivors=min_survivors),
    )
    typer.echo(f"enrolled as {record.device_id} (node {record.node_id}); state in {target}")
    typer.echo(f"next: fedge client start --data DIR --dir {target}")


def start_command(
    data: Annotated[
        Path, typer.Option("--data", help="This device's examples: .npz files (images, labels).")
    ],
    directory: _Dir = None,
    home: _Home = None,
    runtime_port: Annotated[
        int, typer.Option("--runtime-port", help="Loopback port of the SuperNode's runtime API.")
    ] = 9094,
) -> None:
    """Run this device: a SuperNode and the fedge ClientApp, until SIGTERM or Ctrl-C."""
    import logging

    from fl_client.device_runtime import serve_device

    logging.getLogger("fl_client").setLevel(logging.INFO)
    handled = serve_device(_device_dir(directory, home), data, runtime_port=runtime_port)
    typer.echo(f"stopped after {handled} tasks")
