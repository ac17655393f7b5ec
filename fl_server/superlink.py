"""Start a Flower SuperLink for a fedge fleet and drive it through its Control API.

A fleet runs one ``flower-superlink`` process. fedge always starts it with TLS, SuperNode
authentication and ``--isolation process``: the ServerApp is not launched by Flower from
a FAB but runs long-lived inside the fedge coordinator
(:func:`fl_server.serverapp_runner.run_serverapp_in_process`).

Notes
-----
Flower 1.42 serves the Control API (``/v1/control``), the Fleet API (``/v1/fleet``) and
the Runtime API (``/v1/runtime``) over *one* HTTPS port. In the open-source SuperLink the
Control API is unauthenticated: whoever reaches the port can register nodes and start or
stop runs. Bind it to loopback or a private interface and put anything device-facing
behind a reverse proxy that exposes ``/v1/fleet`` only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge_runtime.processes import ProcessStartError, console_script, start_listening
from fedge.errors import ConfigError, FedgeError

__all__ = [
    "ControlClient",
    "RegisteredNode",
    "SuperLinkConfig",
    "SuperLinkError",
    "build_fab",
    "start_superlink",
]

logger = logging.getLogger(__name__)

RunConfigValue = bool | int | float | str
"""A value of a Flower run config (``UserConfigValue``)."""

_APP_NAME = "fedge"


class SuperLinkError(FedgeError, RuntimeError):
    """The SuperLink did not start, or its Control API refused a request."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SuperLinkConfig:
    """How to start one ``flower-superlink`` process.

    Parameters
    ----------
    port : int
        The one HTTPS port serving the Fleet, Control and Runtime APIs.
    ssl_certfile, ssl_keyfile, ssl_ca_certfile : Path
        PEM server certificate, its private key and the CA that signed it.
    log_file : Path
        File that receives the process's stdout and stderr (appended).
    host : str
        Address to bind; loopback by default (see the module Notes).
    database : Path or None
        SQLite file for the link state; ``None`` keeps it in memory.
    superexec_auth_secret_file : Path or None
        Shared secret (raw bytes) that executors must prove to acquire tasks.
    executable : str
        The ``flower-superlink`` command.
    """

    port: int
    ssl_certfile: Path
    ssl_keyfile: Path
    ssl_ca_certfile: Path
    log_file: Path
    host: str = "127.0.0.1"
    database: Path | None = None
    superexec_auth_secret_file: Path | None = None
    executable: str = field(default_factory=lambda: console_script("flower-superlink"))

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port must be in [1, 65535], got {self.port}")
        if not self.host:
            raise ConfigError("host must not be empty")

    @property
    def address(self) -> str:
        """Return ``host:port`` to connect to (loopback when bound to all interfaces)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host  # noqa: S104
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{self.port}"

    def argv(self) -> list[str]:
        """Return the exact ``flower-superlink`` command line."""
        argv = [
            self.executable,
            "--ssl-certfile",
            str(self.ssl_certfile),
            "--ssl-keyfile",
            str(self.ssl_keyfile),
            "--ssl-ca-certfile",
            str(self.ssl_ca_certfile),
            "--enable-supernode-auth",
            "--isolation",
            "process",
            "--disable-runtime-dependency-installation",
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        if self.database is not None:
            argv += ["--database", str(self.database)]
        if self.superexec_auth_secret_file is not None:
            argv += ["--superexec-auth-secret-file", str(self.superexec_auth_secret_file)]
        return argv


def _subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return this process's environment with Flower's telemetry and update check off."""
    env = dict(os.environ)
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    env.update(extra or {})
    return env


def start_superlink(
    config: SuperLinkConfig,
    *,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``flower-superlink`` and wait until its port accepts connections.

    Parameters
    ----------
    config : SuperLinkConfig
        What to start.
    timeout : float
        Seconds to wait for the port.
    env : Mapping[str, str] or None
        Extra environment variables (e.g. ``FLWR_HOME``).

    Returns
    -------
    subprocess.Popen
        The running process; the caller terminates and waits for it.

    Raises
    ------
    SuperLinkError
        If the process exits or the port stays closed for `timeout` seconds; the
        message carries the tail of the log file.
    """
    try:
        process = start_listening(
            config.argv(),
            address=config.address,
            log_file=config.log_file,
            env=_subprocess_env(env),
            timeout=timeout,
        )
    except ProcessStartError as exc:
        raise SuperLinkError(str(exc)) from None
    logger.info("SuperLink listening on %s (pid %d)", config.address, process.pid)
    return process


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisteredNode:
    """A SuperNode the SuperLink knows.

    Parameters
    ----------
    node_id : int
        The id Flower assigned at registration.
    status : str
        Flower's node status (``registered``, ``online``, ``offline``, ...).
    public_key_pem : bytes
        The node's authentication key as PEM SubjectPublicKeyInfo.
    """

    node_id: int
    status: str
    public_key_pem: bytes


def _public_key_pem(public_key: bytes | ec.EllipticCurvePublicKey) -> bytes:
    """Return a NIST-curve EC public key as PEM, as Flower's registry stores it."""
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    if isinstance(public_key, bytes):
        try:
            loaded = serialization.load_pem_public_key(public_key)
        except ValueError:
            try:
                loaded = serialization.load_ssh_public_key(public_key)
            except ValueError as err:
                raise ConfigError("public key is neither PEM nor OpenSSH") from err
    else:
        loaded = public_key
    if not isinstance(loaded, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(loaded):
        raise ConfigError("a SuperNode key must be an EC key on a NIST curve (e.g. P-384)")
    return loaded.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def build_fab(override_config: Mapping[str, RunConfigValue]) -> bytes:
    """Build the minimal FAB a run is started with.

    Its ``pyproject.toml`` names the fedge app and declares every key of
    `override_config` (the SuperLink refuses overrides of undeclared keys); it holds
    no code, since fedge's executors run their own installed apps.
    """
    import tomli_w
    from flwr.cli.build import build_fab_from_files

    pyproject = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": _APP_NAME, "version": "1.0.0", "dependencies": []},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": _APP_NAME,
                    "components": {
                        "serverapp": "fedge_app:server_app",
                        "clientapp": "fedge_app:client_app",
                    },
                    "config": dict(override_config),
                }
            }
        },
    }
    files = {"pyproject.toml": tomli_w.dumps(pyproject).encode("utf-8"), "fedge_app.py": b""}
    fab, _ = build_fab_from_files(files)
    return fab


class ControlClient:
    """A small client of the SuperLink Control API (Flower's own HTTP client).

    Parameters
    ----------
    address : str
        ``host:port`` of the SuperLink.
    root_certificates : bytes
        PEM CA that signed the SuperLink's certificate.
    """

    def __init__(self, address: str, *, root_certificates: bytes) -> None:
        from flwr.supercore.control import ControlHttpClient

        self._client = ControlHttpClient.from_server_address(
            server_address=address,
            insecure=False,
            root_certificates=root_certificates,
            interceptors=(),
        )

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def register_node(self, public_key: bytes | ec.EllipticCurvePublicKey) -> int:
        """Register a SuperNode's authentication key and return its node id.

        Raises
        ------
        ConfigError
            If the key is not an EC key on a NIST curve.
        SuperLinkError
            If the SuperLink refuses (e.g. the key is already registered).
        """
        from flwr.proto.control_pb2 import RegisterNodeRequest

        pem = _public_key_pem(public_key)
        response = self._call("RegisterNode", RegisterNodeRequest(public_key=pem))
        if not response.node_id:
            raise SuperLinkError("the SuperLink did not register the node")
        logger.info("registered SuperNode %d", response.node_id)
        return int(response.node_id)

    def unregister_node(self, node_id: int) -> None:
        """Unregister a SuperNode; its key is refused from then on."""
        from flwr.proto.control_pb2 import UnregisterNodeRequest

        self._call("UnregisterNode", UnregisterNodeRequest(node_id=node_id))
        logger.info("unregistered SuperNode %d", node_id)

    def list_nodes(self) -> list[RegisteredNode]:
        """Return the SuperNodes the SuperLink knows."""
        from flwr.proto.control_pb2 import ListNodesRequest

        response = self._call("ListNodes", ListNodesRequest())
        return [
            RegisteredNode(
                node_id=int(node.node_id), status=node.status, public_key_pem=node.public_key
            )
            for node in response.nodes_info
        ]

    def start_run(self, override_config: Mapping[str, RunConfigValue]) -> int:
        """Start a run of the fedge app and return its run id.

        Parameters
        ----------
        override_config : Mapping[str, bool | int | float | str]
            The run config both executors see as ``context.run_config``.
        """
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        fab = build_fab(override_config)
        request = StartRunRequest(
            fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
            override_config=user_config_to_proto(dict(override_config)),
        )
        response = self._call("StartRun", request)
        if not response.HasField("run_id"):
            raise SuperLinkError("the SuperLink did not start the run")
        logger.info("started run %d", response.run_id)
        return int(response.run_id)

    def stop_run(self, run_id: int) -> None:
        """Stop a run."""
        from flwr.proto.control_pb2 import StopRunRequest

        response = self._call("StopRun", StopRunRequest(run_id=run_id))
        if not response.success:
            raise SuperLinkError(f"the SuperLink did not stop run {run_id}")

    def _call(self, method: str, request: object) -> Any:
        import httpx

        try:
            return getattr(self._client, method)(request)
        except httpx.HTTPStatusError as err:
            raise SuperLinkError(
                f"Control API {method} failed: HTTP {err.response.status_code} "
                f"{err.response.text[:500]}"
            ) from err
        except httpx.HTTPError as err:
            raise SuperLinkError(f"Control API {method} failed: {err}") from err
