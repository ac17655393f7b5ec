"""``fedge client start``: the enrolled device's SuperNode and its long-running ClientApp.

One process per device: it starts Flower's SuperNode (TLS to the gateway,
node authentication with the enrolment key, ``process`` isolation, runtime API
on loopback behind the device's SuperExec secret) and serves every ClientApp
task in this process, so torch and the model are loaded once, not per message.

The ClientApp is the device's own installed fedge code (never code from the
server), trains on the device's own data (``--data``: the local ``.npz``
format), and runs every round through the device's policy: secure aggregation
with its enrolled identity, its lifetime budget, client-level DP. SIGTERM or
SIGINT stops it cleanly; the SuperNode never outlives it.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt
from flwr.app import Context
from flwr.clientapp import ClientApp

from edge_runtime.local_data import load_examples
from edge_runtime.models import ModelName
from edge_runtime.processes import stop_on_signals, stop_process
from edge_runtime.secret_files import read_secret
from edge_runtime.tls import pinned_client_context
from fedge.errors import ConfigError, FedgeError
from fl_client.app import make_client_app
from fl_client.budget import ClientBudget
from fl_client.clientapp_runner import serve_clientapp_in_process
from fl_client.composition import device_mods
from fl_client.device import DeviceKind
from fl_client.device_home import DeviceHome
from fl_client.refusals import RefusalLog
from fl_client.revocations import RevocationStore, nothing_revoked
from fl_client.supernode import SuperNodeConfig, SuperNodeError, start_supernode
from secure_agg.errors import CryptoError
from secure_agg.identity import NodeIdentity

__all__ = ["LocalExamples", "device_client_app", "serve_device"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LocalExamples:
    """The device's own examples, served whatever partition the node config names."""

    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]

    def __call__(
        self, partition_id: int, num_partitions: int
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.integer]]:
        """Return every local example (a device is its own single partition)."""
        del partition_id, num_partitions
        return self.images, self.labels


def _gateway_address(server_url: str) -> str:
    parts = urlsplit(server_url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(f"the enrolled server URL {server_url!r} is not https://host:port")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{parts.port or 443}"


def device_client_app(
    home: DeviceHome,
    data: Path,
    *,
    model: ModelName = ModelName.CNN,
    device: DeviceKind = DeviceKind.AUTO,
) -> tuple[ClientApp, RevocationStore | None]:
    """Return the enrolled device's ClientApp (its policy, identity, budget, data) and its list.

    The mods come in their one order (:func:`fl_client.composition.device_mods`);
    the revocation store is returned so the caller can keep it current.

    Raises
    ------
    ConfigError
        If the device is not enrolled or its state is damaged.
    DataError
        If the local data is missing or malformed.
    """
    record = home.require_enrolled()
    policy = home.load_policy()
    identity = home.identity()
    images, labels = load_examples(data)
    logger.info("device %s: %d local examples", record.device_id, len(images))

    def identities(context: Context) -> NodeIdentity | None:
        del context
        return identity

    budget = (
        None if policy.lifetime_epsilon is None else ClientBudget.for_policy(policy, home.ledger)
    )
    home.ledger.mkdir(parents=True, exist_ok=True)
    revocations = (
        None
        if policy.protocol is None or policy.protocol.authority_public_key is None
        else RevocationStore(home.root, policy=policy.secure_protocol())
    )
    mods = device_mods(
        policy,
        secure=policy.protocol is not None,
        identities=identities,
        budget=budget,
        on_refusal=RefusalLog(home.ledger),
        revocations=nothing_revoked if revocations is None else revocations,
    )
    client_app = make_client_app(
        LocalExamples(images, labels),
        model=model,
        mods=mods,
        budget=budget,
        policy=policy,
        device=device,
    )
    return client_app, revocations


def serve_device(
    directory: Path,
    data: Path,
    *,
    model: ModelName = ModelName.CNN,
    runtime_port: int = 9094,
    device: DeviceKind = DeviceKind.AUTO,
    stop: threading.Event | None = None,
) -> int:
    """Serve the enrolled device in ``directory`` until stopped; return the tasks handled.

    Raises
    ------
    ConfigError
        If the device is not enrolled or its state is damaged.
    DataError
        If the local data is missing or malformed (checked before anything starts).
    SuperNodeError
        If the SuperNode does not start (e.g. the device was revoked).
    """
    home = DeviceHome(directory)
    record = home.require_enrolled()
    secret = read_secret(home.superexec_secret)
    client_app, revocations = device_client_app(home, data, model=model, device=device)
    config = SuperNodeConfig(
        superlink_address=_gateway_address(record.server_url),
        root_certificates=home.ca_cert,
        auth_private_key=home.supernode_key,
        runtime_port=runtime_port,
        log_file=home.logs / "supernode.log",
        superexec_auth_secret_file=home.superexec_secret,
        node_config={"device-id": record.device_id, "partition-id": 0, "num-partitions": 1},
    )
    stopping = stop or threading.Event()
    ca_pem = home.ca_cert.read_bytes()
    supervisor = _SuperNodeSupervisor(
        config,
        record.server_url,
        ca_pem,
        stopping,
        revoked=lambda: _revoked_now(record.server_url, ca_pem, revocations, record.device_id),
        last_active=home.root / "last-active",
    )
    supervisor.start_first()
    watcher = threading.Thread(target=supervisor.run, name="supernode-supervisor", daemon=True)
    watcher.start()
    if revocations is not None:
        refresher = threading.Thread(
            target=_refresh_revocations,
            args=(record.server_url, ca_pem, revocations, stopping),
            name="revocation-refresh",
            daemon=True,
        )
        refresher.start()
    handled: list[int] = []
    # The executor runs on a daemon thread: a stop (SIGTERM, Ctrl-C, the SuperNode gone)
    # gives the task in hand a grace period, then the process leaves even if a pull of a
    # dead run's message still blocks it.
    executor = threading.Thread(
        target=lambda: handled.append(
            serve_clientapp_in_process(
                client_app,
                runtime_address=config.runtime_address,
                superexec_auth_secret=secret,
                stop=stopping,
            )
        ),
        name="clientapp-executor",
        daemon=True,
    )
    try:
        with stop_on_signals(stopping):
            executor.start()
            while executor.is_alive() and not stopping.wait(0.5):
                pass
            executor.join(timeout=_STOP_GRACE_S)
    finally:
        stopping.set()
        watcher.join(timeout=_STOP_GRACE_S)
        supervisor.stop()
    if supervisor.refused is not None:
        raise SuperNodeError(supervisor.refused)
    return handled[0] if handled else 0


_STOP_GRACE_S = 10.0
_MAX_BACKOFF_S = 60.0
_ACTIVATED_S = 20.0
# What Flower's SuperNode logs once the SuperLink has activated it (flwr 1.42).
_ACTIVATED_MARK = b"SuperNode ID: "
_REFUSALS = 3
_REFUSAL_WINDOW_S = 75.0
_ANSWERING_RETRY_S = 5.0


class _SuperNodeSupervisor:
    """Keep the SuperNode running while the server is away; stop for good when it refuses us.

    Flower's SuperNode gives up after a few seconds when it cannot activate (the
    server restarting, a network outage). The supervisor starts it again with
    backoff while the server's gateway does not answer its health check; if the
    gateway answers and the SuperNode still cannot stay up, the server refuses
    this device (revoked, or never registered) and the device stops.
    """

    def __init__(
        self,
        config: SuperNodeConfig,
        server_url: str,
        ca_pem: bytes,
        stop: threading.Event,
        *,
        revoked: Callable[[], bool] = lambda: False,
        last_active: Path | None = None,
    ) -> None:
        self._revoked = revoked
        self._last_active = last_active
        self._config = config
        self._server_url = server_url
        self._ca_pem = ca_pem
        self._stop = stop
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self.refused: str | None = None

    def start_first(self) -> None:
        """Start the SuperNode (raises SuperNodeError if it cannot even start)."""
        self._start()

    def _start(self) -> None:
        self._log_offset = _log_size(self._config.log_file)
        self._process = start_supernode(self._config)

    def _activated(self) -> bool:
        """Whether the running SuperNode has activated (Flower logs its node id then).

        Uptime alone is no sign: a slow machine can spend its whole activation retry
        window starting up, and a refused node would then never count as refused.
        """
        try:
            with self._config.log_file.open("rb") as log:
                log.seek(self._log_offset)
                return _ACTIVATED_MARK in log.read()
        except OSError:
            return False

    def _server_answers(self) -> bool:
        import httpx

        context = pinned_client_context(self._ca_pem)
        try:
            answer = httpx.get(f"{self._server_url}/healthz", verify=context, timeout=5.0)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200

    def _active_recently(self) -> bool:
        """Whether the SuperNode was connected within the SuperLink's online window."""
        if self._last_active is None:
            return False
        try:
            last = float(self._last_active.read_text(encoding="ascii"))
        except (OSError, ValueError):
            return False
        return time.time() - last < _REFUSAL_WINDOW_S

    def _mark_active(self) -> None:
        if self._last_active is not None:
            with contextlib.suppress(OSError):
                self._last_active.write_text(f"{time.time():.0f}", encoding="ascii")

    def run(self) -> None:
        """Watch the SuperNode until stopped; restart it while the server is unreachable.

        A SuperNode that has activated (its log says so) and stays up past
        ``_ACTIVATED_S`` is marked active (on disk, so a restarted device knows too).
        When it exits while the server answers, three failures mean a refusal, but
        not while the node was active within the
        SuperLink's online window (2 x 30 s): the SuperLink refuses to activate a node
        it still counts online, so a quick restart looks like a refusal for a minute.
        """
        backoff = 1.0
        strikes = 0
        started = time.monotonic()
        while not self._stop.is_set():
            process = self._process
            if process is not None and process.poll() is None:
                if time.monotonic() - started > _ACTIVATED_S and self._activated():
                    strikes, backoff = 0, 1.0
                    self._mark_active()
                self._stop.wait(0.5 if strikes else 5.0)
                continue
            code = None if process is None else process.returncode
            answers = self._server_answers()
            if answers and self._revoked():
                self.refused = "this device was revoked (it is on the authority-signed list)"
                logger.error("%s", self.refused)
                self._stop.set()
                return
            if answers:
                strikes += 1
                if strikes >= _REFUSALS and not self._active_recently():
                    self.refused = (
                        f"the server refuses this device (SuperNode exit code {code}): "
                        f"revoked, or not registered; see {self._config.log_file}"
                    )
                    logger.error("%s", self.refused)
                    self._stop.set()
                    return
                wait = _ANSWERING_RETRY_S  # the server is up: retry soon, count strikes
            else:
                logger.warning("the server is unreachable; retrying in %.0f s", backoff)
                wait, backoff = backoff, min(backoff * 2, _MAX_BACKOFF_S)
            if self._stop.wait(wait):
                return
            try:
                self._start()
                started = time.monotonic()
            except SuperNodeError as exc:
                logger.warning("the SuperNode did not start: %s", str(exc).splitlines()[0])
                self._process = None

    def stop(self) -> None:
        """Stop the SuperNode (SIGTERM, then SIGKILL)."""
        if self._process is not None:
            stop_process(self._process)


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


_REVOCATION_REFRESH_S = 30.0


def _fetch_revocations(server_url: str, ca_pem: bytes, store: RevocationStore) -> None:
    import httpx

    context = pinned_client_context(ca_pem)
    answer = httpx.get(f"{server_url}/v1/fedge/revocations", verify=context, timeout=10.0)
    if answer.status_code == 200:
        store.accept(answer.content)


def _revoked_now(
    server_url: str, ca_pem: bytes, store: RevocationStore | None, device_id: str
) -> bool:
    """Return whether this device is on the authority-signed list (fetched now, verified)."""
    if store is None:
        return False
    try:
        _fetch_revocations(server_url, ca_pem, store)
        return device_id in store.revoked_ids()
    except Exception as exc:  # a failed check is not a refusal; the slower rule still holds
        logger.debug("revocation check failed: %s", exc)
        return False


def _refresh_revocations(
    server_url: str, ca_pem: bytes, store: RevocationStore, stop: threading.Event
) -> None:
    """Fetch the authority-signed revocation list now and then; keep only a newer valid one."""
    import httpx

    while not stop.is_set():
        try:
            _fetch_revocations(server_url, ca_pem, store)
        except httpx.HTTPError as exc:
            logger.debug("revocation list not fetched: %s", exc)
        except CryptoError:
            # A list that does not verify, or is older than the one kept, is ignored.
            logger.warning("revocation list refused: it does not verify or is older")
        except FedgeError as exc:
            logger.warning("revocation list refused: %s", exc)
        stop.wait(_REVOCATION_REFRESH_S)
