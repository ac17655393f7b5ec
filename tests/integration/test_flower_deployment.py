"""A real Flower deployment on loopback: SuperLink, two SuperNodes, in-process executors.

``flower-superlink`` and ``flower-supernode`` run as subprocesses with TLS (a test CA) and
SuperNode authentication; the ServerApp and both ClientApps run in this process through
fedge's long-running executors. Two rounds go to every node; each reply carries
node-specific numbers and a counter kept in ``context.state``, which proves the state
persists across a run's messages; a round in which the apps raise gets Error replies
and the executors keep serving. An unregistered key is refused, and a run stopped
through the Control API stops the in-process ServerApp.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fl_client._supernode_main import POLL_ENV
from fl_client.clientapp_runner import serve_clientapp_in_process
from fl_client.supernode import SuperNodeConfig, SuperNodeError, start_supernode
from fl_server.serverapp_runner import ServerAppStoppedError, run_serverapp_in_process
from fl_server.superlink import ControlClient, SuperLinkConfig, start_superlink

pytestmark = [
    pytest.mark.slow,
    # Flower's FAB builder uses a pattern class that pathspec deprecates.
    pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning"),
]

BIN = Path(sys.executable).parent
DEVICE_NUMBERS = (7, 11)
logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@dataclass(frozen=True, slots=True, kw_only=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


def _write_pki(directory: Path) -> Pki:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedge test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(ca=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key")
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


def _node_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Write a P-384 OpenSSH private key to `path`; return its public half."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return key.public_key()


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    config: SuperLinkConfig
    pki: Pki
    secret: bytes
    secret_file: Path
    home: Path


@pytest.fixture
def link(tmp_path: Path, request: pytest.FixtureRequest) -> Link:
    pki = _write_pki(tmp_path)
    secret_file = tmp_path / "superexec.secret"
    secret = b"fedge-test-superexec-secret-0123456789"
    secret_file.write_bytes(secret)
    config = SuperLinkConfig(
        port=_free_port(),
        ssl_certfile=pki.cert,
        ssl_keyfile=pki.key,
        ssl_ca_certfile=pki.ca,
        log_file=tmp_path / "superlink.log",
        database=tmp_path / "link.db",
        superexec_auth_secret_file=secret_file,
        executable=str(BIN / "flower-superlink"),
    )
    home = tmp_path / "flwr-home"
    process = start_superlink(config, env={"FLWR_HOME": str(home / "link")})
    request.addfinalizer(lambda: _stop(process))
    return Link(config=config, pki=pki, secret=secret, secret_file=secret_file, home=home)


@pytest.fixture
def spawn_node(
    link: Link, tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[[str, dict[str, int]], tuple[SuperNodeConfig, subprocess.Popen[bytes]]]:
    def spawn(
        name: str, node_config: dict[str, int]
    ) -> tuple[SuperNodeConfig, subprocess.Popen[bytes]]:
        config = SuperNodeConfig(
            superlink_address=link.config.address,
            root_certificates=link.pki.ca,
            auth_private_key=tmp_path / f"{name}.key",
            runtime_port=_free_port(),
            log_file=tmp_path / f"{name}.log",
            superexec_auth_secret_file=link.secret_file,
            node_config=node_config,
            executable=str(BIN / "flower-supernode"),
        )
        # POLL_ENV: Flower's SuperNode polls every 3 s when idle (see fl_client._supernode_main).
        env = {"FLWR_HOME": str(link.home / name), POLL_ENV: "0.5"}
        process = start_supernode(config, env=env)
        request.addfinalizer(lambda: _stop(process))
        return config, process

    return spawn


def _client_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        if message.content.config_records["config"].get("fail"):
            raise RuntimeError("this round fails on purpose")
        previous = context.state.metric_records.get("calls")
        calls = (int(cast(int, previous["n"])) if previous else 0) + 1
        context.state["calls"] = MetricRecord({"n": calls})
        round_number = int(cast(int, message.content.config_records["config"]["round"]))
        metrics = MetricRecord(
            {
                "device": int(context.node_config["device-number"]),
                "node-id-low": context.node_id % 1_000_003,
                "calls": calls,
                "echo-round": round_number,
            }
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    return app


def _server_app(
    results: dict[int, dict[int, dict[str, float]]], latencies: list[float]
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        deadline = time.monotonic() + 60
        while len(node_ids := list(grid.get_node_ids())) < len(DEVICE_NUMBERS):
            assert time.monotonic() < deadline, f"only nodes {node_ids} came online"
            time.sleep(0.2)
        for round_number in range(1, int(context.run_config["rounds"]) + 1):
            fail = round_number == context.run_config["fail-round"]
            messages = [
                Message(
                    RecordDict({"config": ConfigRecord({"round": round_number, "fail": fail})}),
                    dst_node_id=node_id,
                    message_type="train",
                )
                for node_id in node_ids
            ]
            started = time.perf_counter()
            replies = list(grid.send_and_receive(messages, timeout=60))
            latencies.append(time.perf_counter() - started)
            assert len(replies) == len(node_ids)
            for reply in replies:
                if fail:
                    assert reply.has_error()
                    assert "fails on purpose" in (reply.error.reason or "")
                    continue
                assert not reply.has_error(), reply.error
                metrics = reply.content.metric_records["metrics"]
                results.setdefault(round_number, {})[reply.metadata.src_node_id] = {
                    key: float(cast(float, value)) for key, value in metrics.items()
                }

    return app


def _start_executors(
    configs: list[SuperNodeConfig], secret: bytes, stop: threading.Event
) -> list[threading.Thread]:
    threads = [
        threading.Thread(
            target=serve_clientapp_in_process,
            args=(_client_app(),),
            kwargs={
                "runtime_address": config.runtime_address,
                "superexec_auth_secret": secret,
                "stop": stop,
                "poll_interval": 0.05,
            },
            name=f"clientapp-{index}",
            daemon=True,
        )
        for index, config in enumerate(configs)
    ]
    for thread in threads:
        thread.start()
    return threads


@pytest.fixture
def stop_event() -> Iterator[threading.Event]:
    stop = threading.Event()
    yield stop
    stop.set()


def test_rounds_over_tls_with_node_auth_and_in_process_executors(
    link: Link,
    spawn_node: Callable[[str, dict[str, int]], tuple[SuperNodeConfig, subprocess.Popen[bytes]]],
    stop_event: threading.Event,
    tmp_path: Path,
) -> None:
    ca = link.pki.ca.read_bytes()
    with ControlClient(link.config.address, root_certificates=ca) as control:
        node_ids = [
            control.register_node(_node_key(tmp_path / f"node{i}.key"))
            for i in range(len(DEVICE_NUMBERS))
        ]
        configs = [
            spawn_node(f"node{i}", {"device-number": number})[0]
            for i, number in enumerate(DEVICE_NUMBERS)
        ]
        executors = _start_executors(configs, link.secret, stop_event)

        # A key nobody registered is refused: that SuperNode exits with an error.
        _node_key(tmp_path / "intruder.key")
        try:
            _, intruder = spawn_node("intruder", {"device-number": 99})
            intruder.wait(timeout=60)
            refused = intruder.returncode
        except SuperNodeError:
            refused = -1
        assert refused != 0
        assert "Failed to activate SuperNode" in (tmp_path / "intruder.log").read_text()
        assert len(control.list_nodes()) == len(DEVICE_NUMBERS)

        results: dict[int, dict[int, dict[str, float]]] = {}
        latencies: list[float] = []
        run_id = control.start_run({"rounds": 3, "fail-round": 2})
        timer = threading.Timer(120, stop_event.set)
        timer.start()
        try:
            outcome = run_serverapp_in_process(
                _server_app(results, latencies),
                runtime_address=link.config.address,
                root_certificates=ca,
                superexec_auth_secret=link.secret,
                stop=stop_event,
                poll_interval=0.05,
            )
        finally:
            timer.cancel()
        assert outcome is not None
        assert outcome.run_id == run_id

        control.unregister_node(node_ids[0])
        statuses = {node.node_id: node.status for node in control.list_nodes()}

    stop_event.set()
    for thread in executors:
        thread.join(timeout=30)
        assert not thread.is_alive()

    by_device = {int(r["device"]): r for r in results[1].values()}
    assert sorted(by_device) == sorted(DEVICE_NUMBERS)
    assert sorted(results[1]) == sorted(node_ids)
    # Round 2 raised in every app (Error replies); the executors kept serving round 3.
    assert sorted(results) == [1, 3]
    for round_number, calls in ((1, 1), (3, 2)):
        for node_id, metrics in results[round_number].items():
            assert metrics["calls"] == calls, "context.state did not persist"
            assert metrics["echo-round"] == round_number
            assert metrics["node-id-low"] == node_id % 1_000_003
    assert statuses[node_ids[0]] == "unregistered"
    logger.warning("round trips: %s", ", ".join(f"{t:.2f} s" for t in latencies))
    print("round trips (s):", [round(t, 2) for t in latencies])


def test_stopping_a_run_stops_the_in_process_serverapp(link: Link) -> None:
    ca = link.pki.ca.read_bytes()
    started = threading.Event()
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        started.set()
        while True:  # waits for nodes that never come, until the run is stopped
            grid.get_node_ids()
            time.sleep(0.2)

    stop = threading.Event()
    outcome: list[BaseException] = []

    def serve() -> None:
        try:
            run_serverapp_in_process(
                app,
                runtime_address=link.config.address,
                root_certificates=ca,
                superexec_auth_secret=link.secret,
                stop=stop,
                poll_interval=0.05,
            )
        except BaseException as err:
            outcome.append(err)

    with ControlClient(link.config.address, root_certificates=ca) as control:
        run_id = control.start_run({})
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            assert started.wait(timeout=30)
            control.stop_run(run_id)
            thread.join(timeout=30)
        finally:
            stop.set()
            thread.join(timeout=30)
    assert not thread.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], ServerAppStoppedError), repr(outcome[0])
