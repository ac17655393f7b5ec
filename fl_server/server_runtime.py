"""``fedge server start DIR``: the cloud side of a deployment as one supervised process tree.

The supervisor (this process) records the configuration in the audit trail
(``config.loaded``, and ``config.changed`` when it differs from the last
start's; see :mod:`fl_server.deployment_audit`), then starts:

1. Flower's SuperLink on loopback (TLS, SuperNode authentication, ``process``
   isolation, state in ``state/superlink.db``);
2. the gateway (``python -m fl_server.gateway DIR``), the one public port;

then submits a Flower run through the SuperLink's Control API and executes
the fedge ServerApp for it in this process through the coordinator (database,
audit, ledger, store, summary). On SIGTERM or SIGINT the run is recorded as
interrupted, the Flower run is stopped, and both children are terminated and
waited for. Each child also gets SIGTERM from the kernel if the supervisor dies
without cleaning up (SIGKILL), so no process outlives it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp import ServerApp
from sqlalchemy import Engine

from edge_runtime.processes import die_with_parent, log_tail, stop_on_signals, stop_process
from edge_runtime.secret_files import read_secret
from fedge.errors import ConfigError, FedgeError
from fl_server.audit import AuditLog
from fl_server.audit.trust import AuditTrust
from fl_server.checkpoints import load_weights
from fl_server.coordinator import Resume, RunLocation, RunPlan, new_run_id, run_coordinated
from fl_server.db import open_database
from fl_server.deployment import DeploymentConfig, DeploymentLayout, load_config, split_address
from fl_server.deployment_audit import record_config
from fl_server.deployment_plan import build_plan
from fl_server.enrolment.registry import DeviceRegistry, DeviceStatus
from fl_server.federation import RoundObserver
from fl_server.ledger import PrivacyLedger
from fl_server.metrics import DeviceCounts, RunMetrics
from fl_server.run_summary import RunStatus, RunSummary, write_json_atomically
from fl_server.serverapp_runner import run_serverapp_in_process
from fl_server.superlink import ControlClient, SuperLinkConfig, start_superlink

__all__ = ["ServerProcesses", "serve_deployment", "supervised_processes"]

logger = logging.getLogger(__name__)

_GATEWAY_START_S = 30.0


@dataclass(frozen=True, slots=True)
class ServerProcesses:
    """The supervised children and what the coordinator needs to reach them."""

    superlink: subprocess.Popen[bytes]
    gateway: subprocess.Popen[bytes]
    superlink_address: str
    ca_pem: bytes


def _wait_for_gateway(process: subprocess.Popen[bytes], url: str, ca: Path, log: Path) -> None:
    deadline = time.monotonic() + _GATEWAY_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FedgeError(f"the gateway exited with code {process.returncode}:\n{log_tail(log)}")
        try:
            if httpx.get(f"{url}/v1/fedge/ca.pem", verify=str(ca), timeout=1.0).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise FedgeError(f"the gateway did not answer on {url} within {_GATEWAY_START_S:.0f} s")


@contextmanager
def supervised_processes(
    layout: DeploymentLayout, config: DeploymentConfig
) -> Iterator[ServerProcesses]:
    """Start the SuperLink and the gateway; stop both (SIGTERM, then SIGKILL) on exit.

    Raises
    ------
    FedgeError
        If either does not start (with the tail of its log).
    """
    layout.logs.mkdir(parents=True, exist_ok=True)
    superlink = start_superlink(
        SuperLinkConfig(
            port=config.server.superlink_port,
            ssl_certfile=layout.server_cert,
            ssl_keyfile=layout.server_key,
            ssl_ca_certfile=layout.ca_cert,
            log_file=layout.logs / "superlink.log",
            database=layout.superlink_db,
            superexec_auth_secret_file=layout.superexec_secret,
        )
    )
    gateway: subprocess.Popen[bytes] | None = None
    try:
        gateway_log = layout.logs / "gateway.log"
        with gateway_log.open("ab") as log:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "fl_server.gateway", str(layout.root)],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - only prctl, no locks taken
            )
        host, port = split_address(config.server.address, "server.address")
        local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104
        _wait_for_gateway(gateway, f"https://{local}:{port}", layout.ca_cert, gateway_log)
        yield ServerProcesses(
            superlink=superlink,
            gateway=gateway,
            superlink_address=f"127.0.0.1:{config.server.superlink_port}",
            ca_pem=layout.ca_cert.read_bytes(),
        )
    finally:
        if gateway is not None:
            stop_process(gateway)
        stop_process(superlink)


def _write_current_run(layout: DeploymentLayout, run_id: str, flower_run: int) -> None:
    document = {"run_id": run_id, "flower_run_id": flower_run, "status": "running"}
    write_json_atomically(layout.current_run, document)


def _interrupted_run(layout: DeploymentLayout) -> tuple[str, int | None] | None:
    """Return (run id, Flower run id) of a run a killed process left, or None."""
    path = layout.current_run
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        run_id = str(document["run_id"])
        flower = document.get("flower_run_id")
        flower_run = None if flower is None else int(flower)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is damaged ({exc}); remove it to start a new run") from None
    summary = layout.runs / run_id / "summary.json"
    if not summary.exists():
        return None  # killed before its first record: nothing to resume
    return run_id, flower_run


def _resume_point(location: RunLocation, plan: RunPlan) -> Resume | None:
    try:
        summary = RunSummary.from_json(json.loads(location.summary.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {location.summary} to resume: {exc}") from None
    if summary.status != RunStatus.RUNNING:
        return None
    if not summary.rounds:
        return Resume(summary=summary, last_round=0, arrays=plan.initial_arrays)
    last = summary.rounds[-1]
    weights = load_weights(Path(last["model_path"]), expected_sha256=str(last["model_sha256"]))
    arrays = ArrayRecord({name: Array(np.asarray(value)) for name, value in weights.items()})
    return Resume(summary=summary, last_round=int(last["round"]), arrays=arrays)


class _DeviceNames:
    """Name a Flower node by its enrolled device id (cached; unknown nodes keep their id)."""

    def __init__(self, registry: DeviceRegistry) -> None:
        self._registry = registry
        self._known: dict[str, str] = {}

    def __call__(self, subject: str) -> str:
        if subject in self._known or not subject.isdigit():
            return self._known.get(subject, subject)
        device = self._registry.device_for_node(int(subject))
        if device is None:
            return subject
        self._known[subject] = device.device_id
        return device.device_id


@contextmanager
def _reading(url: str) -> Iterator[Engine]:
    engine = open_database(url, create=False)
    try:
        yield engine
    finally:
        engine.dispose()


def _device_counts(registry: DeviceRegistry) -> DeviceCounts:
    devices = registry.list()
    revoked = sum(1 for d in devices if d.status is DeviceStatus.REVOKED)
    return DeviceCounts(enrolled=len(devices) - revoked, revoked=revoked)


def _unregister_revoked(registry: DeviceRegistry, control: ControlClient) -> None:
    """Remove from the SuperLink every node whose device was revoked while it was down."""
    revoked = registry.list(status=DeviceStatus.REVOKED)
    registered = {node.node_id: node.status for node in control.list_nodes()}
    for device in revoked:
        if device.node_id is not None and registered.get(device.node_id) not in (
            None,
            "unregistered",
        ):
            control.unregister_node(device.node_id)
            logger.info("removed revoked device %s (node %d)", device.device_id, device.node_id)


def serve_deployment(
    root: Path,
    *,
    observers: Sequence[RoundObserver] = (),
    run_id: str | None = None,
    keep_serving: bool = False,
    on_run_end: Callable[[RunSummary], None] | None = None,
) -> RunSummary:
    """Run the deployment's configured federation to its end and return its summary.

    With ``keep_serving`` the SuperLink, the gateway (enrolment, revocations,
    health) and the metrics stay up after the run until SIGTERM or SIGINT, as a
    long-running service (a container that exited would be restarted and start a
    new run); ``on_run_end`` is told the summary as soon as the run ends.

    Raises
    ------
    ConfigError
        If ``root`` is not a deployment or its configuration or secrets are bad.
    DataError
        If the evaluation set is missing or malformed.
    FedgeError
        If a supervised process does not start, or the run fails.
    """
    layout = DeploymentLayout(root)
    layout.require_initialised()
    config = load_config(layout.config)
    secret = read_secret(layout.superexec_secret)
    interrupted = _interrupted_run(layout)
    chosen_run = interrupted[0] if interrupted else (run_id or new_run_id())
    plan = build_plan(config, layout, chosen_run)  # bad data fails before anything starts
    run_dir = layout.runs / chosen_run
    location = RunLocation(
        summary=run_dir / "summary.json",
        models=run_dir / "models",
        db_url=layout.database_url(config),
        store_dir=layout.store,
        audit_dir=AuditTrust.of_home(layout.root).directory,
    )
    resume = None if interrupted is None else _resume_point(location, plan)
    # One read connection pool for the supervisor's own lookups (device names, metrics).
    with _reading(location.db_url) as reader:
        audit = AuditLog(reader)
        record_config(audit, config, run_id=chosen_run)
        registry = DeviceRegistry(reader, audit)
        stop = threading.Event()
        privacy = plan.privacy
        metrics = RunMetrics(
            run_id=chosen_run,
            model=config.federation.model.value,
            devices=lambda: _device_counts(registry),
            epsilon=None
            if privacy is None
            else partial(
                PrivacyLedger(reader, accountant=privacy.accountant).run_epsilon,
                chosen_run,
                delta=privacy.delta,
            ),
        )
        with (
            supervised_processes(layout, config) as processes,
            metrics.serve(config.server.metrics_address),
            ControlClient(processes.superlink_address, root_certificates=processes.ca_pem) as c,
        ):
            _unregister_revoked(registry, c)
            if interrupted is not None and interrupted[1] is not None:
                with contextlib.suppress(FedgeError):
                    c.stop_run(interrupted[1])  # the crashed process's Flower run
            flower_run = c.start_run({"fedge-run-id": chosen_run})
            _write_current_run(layout, chosen_run, flower_run)
            logger.info("run %s: Flower run %d submitted", chosen_run, flower_run)

            def host(server_app: ServerApp) -> None:
                result = run_serverapp_in_process(
                    server_app,
                    runtime_address=processes.superlink_address,
                    root_certificates=processes.ca_pem,
                    superexec_auth_secret=secret,
                    stop=stop,
                )
                if result is None:
                    raise ConfigError("the SuperLink handed out no run")

            try:
                summary = run_coordinated(
                    plan,
                    location,
                    host,
                    observers=[metrics, *observers],
                    resume=resume,
                    subject_name=_DeviceNames(registry),
                )
            finally:
                stop.set()
                with contextlib.suppress(FedgeError):  # a finished run cannot be stopped
                    c.stop_run(flower_run)
                layout.current_run.unlink(missing_ok=True)
            if on_run_end is not None:
                on_run_end(summary)
            if keep_serving:
                logger.info("run %s ended (%s); serving until SIGTERM", chosen_run, summary.status)
                done = threading.Event()
                with stop_on_signals(done):
                    while not done.wait(1.0):
                        pass
            return summary
