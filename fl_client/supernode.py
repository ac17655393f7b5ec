"""Start the Flower SuperNode of one fedge device.

Each device runs one ``flower-supernode`` process: it authenticates to the SuperLink with
the device's EC key over TLS and holds the messages of a run until the device's
long-running ClientApp executor (:func:`fl_client.clientapp_runner.serve_clientapp_in_process`)
acquires them from the SuperNode's Runtime API. fedge always starts it with
``--isolation process``, so the SuperNode never launches ``flwr-clientapp`` processes
nor installs the run's FAB.

Notes
-----
The SuperNode's Runtime API serves the task tokens and messages of this device: bind it to
loopback (the default) and protect ``AcquireTask`` with the SuperExec secret, so that no
other local process can take the device's tasks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from edge_runtime.processes import ProcessStartError, console_script, start_listening
from fedge.errors import ConfigError, FedgeError
from fl_client._supernode_main import poll_cap

__all__ = ["SuperNodeConfig", "SuperNodeError", "format_node_config", "start_supernode"]

logger = logging.getLogger(__name__)

NodeConfigValue = bool | int | float | str
"""A value of a Flower node config (``UserConfigValue``)."""

_NODE_CONFIG_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class SuperNodeError(FedgeError, RuntimeError):
    """The SuperNode did not start or exited early (e.g. its key is not registered)."""


def format_node_config(node_config: Mapping[str, NodeConfigValue]) -> str:
    """Return `node_config` as the ``--node-config`` string Flower parses.

    Raises
    ------
    ConfigError
        If a key is not a bare TOML key, a string holds a quote, backslash or control
        character, or a float is not finite.
    """
    pairs = []
    for key, value in node_config.items():
        if not _NODE_CONFIG_KEY.fullmatch(key):
            raise ConfigError(f"node config key {key!r} must match {_NODE_CONFIG_KEY.pattern}")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ConfigError(f"node config {key!r} must be finite, got {value}")
            text = repr(value)
        else:
            if any(c in value for c in "\"\\'") or not value.isprintable():
                raise ConfigError(f"node config {key!r} holds a quote or control character")
            text = json.dumps(value)
        pairs.append(f"{key}={text}")
    return " ".join(pairs)


@dataclass(frozen=True, slots=True, kw_only=True)
class SuperNodeConfig:
    """How to start one ``flower-supernode`` process.

    Parameters
    ----------
    superlink_address : str
        ``host:port`` of the SuperLink's Fleet API.
    root_certificates : Path
        PEM CA that signed the SuperLink's certificate.
    auth_private_key : Path
        The device's EC private key in OpenSSH format (its public half is registered
        with the SuperLink).
    runtime_port : int
        Port of this SuperNode's Runtime API, which the executor polls.
    log_file : Path
        File that receives the process's stdout and stderr (appended).
    runtime_host : str
        Address the Runtime API binds; loopback by default.
    superexec_auth_secret_file : Path or None
        Shared secret (raw bytes) the executor must prove to acquire tasks.
    node_config : Mapping[str, bool | int | float | str]
        The device's ``context.node_config``.
    executable : str
        The ``flower-supernode`` command.
    """

    superlink_address: str
    root_certificates: Path
    auth_private_key: Path
    runtime_port: int
    log_file: Path
    runtime_host: str = "127.0.0.1"
    superexec_auth_secret_file: Path | None = None
    node_config: Mapping[str, NodeConfigValue] = field(default_factory=lambda: MappingProxyType({}))
    executable: str = field(default_factory=lambda: console_script("flower-supernode"))

    def __post_init__(self) -> None:
        if not 1 <= self.runtime_port <= 65535:
            raise ConfigError(f"runtime_port must be in [1, 65535], got {self.runtime_port}")
        if ":" not in self.superlink_address:
            raise ConfigError(
                f"superlink_address must be host:port, got {self.superlink_address!r}"
            )
        format_node_config(self.node_config)  # validates

    @property
    def runtime_address(self) -> str:
        """Return ``host:port`` of the Runtime API for the executor."""
        host = self.runtime_host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
        return f"[{host}]:{self.runtime_port}" if ":" in host else f"{host}:{self.runtime_port}"

    def argv(self) -> list[str]:
        """Return the exact ``flower-supernode`` command line."""
        argv = [
            self.executable,
            "--superlink",
            self.superlink_address,
            "--root-certificates",
            str(self.root_certificates),
            "--auth-supernode-private-key",
            str(self.auth_private_key),
            "--isolation",
            "process",
            "--host",
            self.runtime_host,
            "--port",
            str(self.runtime_port),
        ]
        if self.superexec_auth_secret_file is not None:
            argv += ["--superexec-auth-secret-file", str(self.superexec_auth_secret_file)]
        if self.node_config:
            argv += ["--node-config", format_node_config(self.node_config)]
        return argv


def start_supernode(
    config: SuperNodeConfig,
    *,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``flower-supernode`` and wait until its Runtime API accepts connections.

    Parameters
    ----------
    config : SuperNodeConfig
        What to start.
    timeout : float
        Seconds to wait for the Runtime API port.
    env : Mapping[str, str] or None
        Extra environment variables (e.g. ``FLWR_HOME``); Flower's telemetry and update
        check are always off. Where ``FEDGE_TEST_SUPERNODE_POLL_S`` is set (tests only),
        the SuperNode runs through :mod:`fl_client._supernode_main`, which caps its idle
        poll (3 s in Flower) at that many seconds.

    Returns
    -------
    subprocess.Popen
        The running process; the caller terminates and waits for it. A SuperNode whose
        key the SuperLink refuses exits shortly after this returns.

    Raises
    ------
    SuperNodeError
        If the process exits or the port stays closed for `timeout` seconds; the message
        carries the tail of the log file.
    """
    process_env = dict(os.environ)
    process_env.update(env or {})
    process_env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    argv = config.argv()
    if poll_cap(process_env) is not None and Path(argv[0]).name == "flower-supernode":
        # Tests only (see fl_client._supernode_main): the same SuperNode, its idle poll capped.
        argv = [sys.executable, "-m", "fl_client._supernode_main", *argv[1:]]
    try:
        process = start_listening(
            argv,
            address=config.runtime_address,
            log_file=config.log_file,
            env=process_env,
            timeout=timeout,
        )
    except ProcessStartError as exc:
        raise SuperNodeError(str(exc)) from None
    logger.info("SuperNode runtime API on %s (pid %d)", config.runtime_address, process.pid)
    return process
