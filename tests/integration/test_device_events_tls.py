"""The Mosquitto configuration of docs/device-events.md, run for real: mutual TLS, the
certificate's CN as the MQTT user, and an ACL that confines each device to its own topic.

A private ``mosquitto`` is started on a free loopback port with certificates from
:mod:`fl_server.pki` (the deployment's TLS CA); skipped where the binary is missing.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy import Engine

from edge_runtime.device_events import EventKind
from edge_runtime.mqtt_config import MqttConfig, connect_properties, event_topic
from edge_runtime.mqtt_publisher import EventPublisher
from fl_server.audit import AuditLog
from fl_server.events import EventIngestor, EventStore, MqttIngestService, RejectionRecorder
from fl_server.pki import (
    certificate_to_pem,
    create_ca,
    issue_device_certificate,
    issue_server_certificate,
    private_key_to_pem,
)
from secure_agg.identity import EnrolmentAuthority
from secure_agg.randomness import DeterministicRandom

MOSQUITTO = shutil.which("mosquitto") or next(
    (path for path in ("/usr/sbin/mosquitto",) if Path(path).exists()), None
)
pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="needs the mosquitto binary")

NOW = datetime.now(UTC)
AUTHORITY = EnrolmentAuthority.generate(DeterministicRandom(8))
EXPIRES = int((NOW + timedelta(days=30)).timestamp())
DEVICE_A = AUTHORITY.enrol("dev-00000000000000a1", DeterministicRandom(81), expires_at=EXPIRES)
DEVICE_B = AUTHORITY.enrol("dev-00000000000000b2", DeterministicRandom(82), expires_at=EXPIRES)
INGESTOR = "fedge-ingestor"

# The listener and ACL of docs/device-events.md ("TLS and per-device credentials").
CONF = """\
per_listener_settings false
allow_anonymous false
listener {port} 127.0.0.1
cafile {directory}/ca.pem
certfile {directory}/server.pem
keyfile {directory}/server.key
require_certificate true
use_identity_as_username true
tls_version tlsv1.2
acl_file {directory}/acl
max_queued_messages 100000
persistence false
log_dest none
user {user}
"""
ACL = """\
user fedge-ingestor
topic read fedge/devices/+/events

pattern write fedge/devices/%u/events
"""


@dataclass(frozen=True, slots=True)
class Broker:
    port: int
    directory: Path

    def config(self, client: str, **fields: object) -> MqttConfig:
        return MqttConfig(
            host="127.0.0.1",
            port=self.port,
            ca_file=self.directory / "ca.pem",
            cert_file=self.directory / f"{client}.pem",
            key_file=self.directory / f"{client}.key",
            **fields,  # type: ignore[arg-type]
        )


def _write_pki(directory: Path) -> None:
    ca_key, ca_cert = create_ca("fedge test CA", valid_days=10, now=NOW)
    (directory / "ca.pem").write_bytes(certificate_to_pem(ca_cert))
    server_key, server_cert = issue_server_certificate(
        ca_key, ca_cert, sans=["127.0.0.1", "localhost"], valid_days=2, now=NOW
    )
    (directory / "server.pem").write_bytes(certificate_to_pem(server_cert))
    (directory / "server.key").write_bytes(private_key_to_pem(server_key))
    for client in (INGESTOR, DEVICE_A.certificate.enrolment_id, DEVICE_B.certificate.enrolment_id):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue_device_certificate(
            ca_key, ca_cert, device_id=client, public_key=key.public_key(), valid_days=2, now=NOW
        )
        (directory / f"{client}.pem").write_bytes(certificate_to_pem(cert))
        (directory / f"{client}.key").write_bytes(private_key_to_pem(key))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    assert MOSQUITTO is not None
    directory = tmp_path / "broker"
    directory.mkdir()
    _write_pki(directory)
    (directory / "acl").write_text(ACL)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = directory / "mosquitto.conf"
    config.write_text(CONF.format(port=port, directory=directory, user=getpass.getuser()))
    process = subprocess.Popen(
        [MOSQUITTO, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    error = process.stderr.read() if process.stderr else b""
                    pytest.fail(f"mosquitto did not start: {error!r}")
                time.sleep(0.05)
        yield Broker(port, directory)
    finally:
        process.terminate()
        process.wait(10)


def _eventually(check: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


def _raw_publish(broker: Broker, client: str, topic: str, payload: bytes) -> int:
    """Publish once with ``client``'s certificate; return the PUBACK reason code."""
    codes: list[int] = []
    done = threading.Event()
    paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{client}-raw", protocol=mqtt.MQTTv5)
    context = broker.config(client).tls_context()
    assert context is not None
    paho.tls_set_context(context)

    def on_publish(
        client: mqtt.Client, userdata: object, mid: int, code: ReasonCode, properties: object
    ) -> None:
        codes.append(code.value)
        done.set()

    paho.on_publish = on_publish
    paho.connect("127.0.0.1", broker.port, properties=connect_properties())
    paho.loop_start()
    try:
        paho.publish(topic, payload, qos=1)
        assert done.wait(10), "no PUBACK"
    finally:
        paho.disconnect()
        paho.loop_stop()
    return codes[0]


def test_devices_publish_over_mutual_tls_and_only_on_their_own_topic(
    broker: Broker, engine: Engine, tmp_path: Path
) -> None:
    ingestor = EventIngestor(
        EventStore(engine),
        authority_public_key=AUTHORITY.public_key,
        rejections=RejectionRecorder(AuditLog(engine)),
    )
    service = MqttIngestService(
        broker.config(INGESTOR, client_id=INGESTOR), ingestor, session_expiry_s=0
    )
    service.start()
    try:
        assert service.wait_subscribed(10)
        device = DEVICE_A.certificate.enrolment_id
        publisher = EventPublisher(
            broker.config(device), DEVICE_A, tmp_path / "a", flush_interval_s=0.1
        )
        publisher.start()
        event = publisher.emit(EventKind.HEALTH, {"error_rate": 0.0})
        assert _eventually(lambda: ingestor.store.count() == 1)
        publisher.close()

        # Device A's certificate on device B's topic: the broker's ACL refuses it (0x87).
        victim = event_topic(DEVICE_B.certificate.enrolment_id)
        assert _raw_publish(broker, device, victim, event.to_bytes()) == 0x87
        # The ingestor's certificate may read, not write.
        assert _raw_publish(broker, INGESTOR, event_topic(device), event.to_bytes()) == 0x87
        time.sleep(0.3)
        assert ingestor.stats().received == 1
    finally:
        service.close(end_session=True)


def test_a_client_without_a_certificate_is_refused(broker: Broker) -> None:
    connected = threading.Event()
    paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="nobody", protocol=mqtt.MQTTv5)
    context = MqttConfig(
        host="127.0.0.1", port=broker.port, ca_file=broker.directory / "ca.pem"
    ).tls_context()
    assert context is not None
    paho.tls_set_context(context)
    paho.on_connect = lambda c, u, f, code, p: connected.set() if not code.is_failure else None
    paho.connect_async("127.0.0.1", broker.port)
    paho.loop_start()
    try:
        assert not connected.wait(2)  # the handshake fails: no client certificate
    finally:
        paho.loop_stop()
