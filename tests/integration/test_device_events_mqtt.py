"""Device events end to end over the real Mosquitto on 127.0.0.1:1883: publisher -> broker ->
ingestor -> database (SQLite, and PostgreSQL when configured), with the broker, the ingestor
or the database away for a while.

Each test uses its own topic root and ingestor client id, so tests (and other users of the
shared broker) never see each other's messages, and ends its broker session.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import Engine

from edge_runtime.device_events import EventKind
from edge_runtime.mqtt_config import MqttConfig, event_topic
from edge_runtime.mqtt_publisher import EventPublisher, PublisherOffline
from fedge.errors import StorageError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.events import (
    EventIngestor,
    EventStore,
    MqttIngestService,
    RejectionRecorder,
)
from secure_agg.identity import EnrolmentAuthority, NodeIdentity
from secure_agg.randomness import DeterministicRandom

BROKER = ("127.0.0.1", 1883)
AUTHORITY = EnrolmentAuthority.generate(DeterministicRandom(5))
EXPIRES = int((datetime.now(UTC) + timedelta(days=30)).timestamp())
DEVICES = [
    AUTHORITY.enrol(f"dev-{n:016x}", DeterministicRandom(50 + n), expires_at=EXPIRES)
    for n in range(3)
]


def _broker_answers() -> bool:
    try:
        with socket.create_connection(BROKER, timeout=1):
            return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(
    not _broker_answers(),
    reason="needs the Mosquitto broker on 127.0.0.1:1883 (apt-get install mosquitto)",
)


def _eventually(check: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


class Proxy:
    """A TCP relay to the broker that can be cut (connections dropped, new ones refused)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.port: int = self._server.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._open.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._open.clear()
        with self._lock:
            for end in self._sockets:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()
            self._sockets.clear()

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._server.close()
        self._thread.join()


@pytest.fixture
def root() -> str:
    return f"fedge-test-{secrets.token_hex(4)}"


def _config(root: str, *, port: int = BROKER[1], client_id: str | None = None) -> MqttConfig:
    return MqttConfig(host="127.0.0.1", port=port, tls=False, topic_root=root, client_id=client_id)


class Cloud:
    """An ingest service on a database, restartable under the same session."""

    def __init__(self, engine: Engine, root: str) -> None:
        self.audit = AuditLog(engine)
        self.ingestor = EventIngestor(
            EventStore(engine),
            authority_public_key=AUTHORITY.public_key,
            rejections=RejectionRecorder(self.audit),
            topic_root=root,
        )
        self.config = _config(root, client_id=f"ingestor-{root}")
        self.service: MqttIngestService | None = None

    @property
    def store(self) -> EventStore:
        return self.ingestor.store

    def start(self) -> None:
        self.service = MqttIngestService(
            self.config, self.ingestor, session_expiry_s=120, audit_flush_s=0.2
        )
        self.service.start()
        assert self.service.wait_subscribed(10), "the ingestor did not subscribe"

    def stop(self, *, end_session: bool = False) -> None:
        if self.service is not None:
            self.service.close(end_session=end_session)
            self.service = None


@pytest.fixture
def cloud(engine: Engine, root: str) -> Iterator[Cloud]:
    cloud = Cloud(engine, root)
    yield cloud
    cloud.stop(end_session=True)
    # A session left from a stop without end_session: join it once more to end it.
    cleanup = MqttIngestService(cloud.config, cloud.ingestor, session_expiry_s=0)
    cleanup.start()
    cleanup.wait_subscribed(5)
    cleanup.close(end_session=True)


def _publisher(
    identity: NodeIdentity, directory: Path, config: MqttConfig, **options: float
) -> EventPublisher:
    return EventPublisher(config, identity, directory, flush_interval_s=0.1, **options)  # type: ignore[arg-type]


def _device_id(identity: NodeIdentity) -> str:
    return identity.certificate.enrolment_id


def test_events_flow_from_publishers_through_mosquitto_into_the_database(
    cloud: Cloud, root: str, tmp_path: Path
) -> None:
    cloud.start()
    publishers = [
        _publisher(identity, tmp_path / _device_id(identity), _config(root)) for identity in DEVICES
    ]
    for publisher in publishers:
        publisher.start()
        assert publisher.wait_connected(10)
    for number in range(20):
        for publisher in publishers:
            publisher.emit(EventKind.HEALTH, {"n": number, "error_rate": 0.0})

    assert _eventually(lambda: cloud.store.count() == 60)
    for publisher in publishers:
        assert _eventually(lambda p=publisher: p.pending == 0)  # type: ignore[misc]
        publisher.close()
    for identity in DEVICES:
        events = cloud.store.events(devices=[_device_id(identity)])
        assert [event.seq for event in events] == list(range(1, 21))
        assert cloud.store.latest_seq(_device_id(identity)) == 20
    stats = cloud.ingestor.stats()
    assert stats.stored == 60
    assert stats.rejected_total == 0


def test_a_broker_that_was_unreachable_gets_every_buffered_event_once(
    cloud: Cloud, root: str, tmp_path: Path
) -> None:
    cloud.start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    offline = _publisher(DEVICES[0], tmp_path / "device", _config(root, port=closed_port))
    offline.start()
    for number in range(10):
        offline.emit(EventKind.TELEMETRY, {"n": number})
    with pytest.raises(PublisherOffline):
        offline.flush()
    offline.close()
    assert cloud.store.count() == 0

    online = _publisher(DEVICES[0], tmp_path / "device", _config(root))
    assert online.pending == 10
    online.start()

    assert _eventually(lambda: online.pending == 0)
    online.close()
    assert _eventually(lambda: cloud.store.count() == 10)
    assert [event.seq for event in cloud.store.events()] == list(range(1, 11))


def test_an_outage_mid_stream_loses_nothing_and_stores_no_duplicate(
    cloud: Cloud, root: str, tmp_path: Path
) -> None:
    cloud.start()
    proxy = Proxy(BROKER)
    try:
        publisher = _publisher(DEVICES[1], tmp_path / "device", _config(root, port=proxy.port))
        publisher.start()
        assert publisher.wait_connected(10)
        for number in range(5):
            publisher.emit(EventKind.HEALTH, {"n": number})
        assert _eventually(lambda: cloud.store.count() == 5)

        proxy.cut()
        assert _eventually(lambda: not publisher.connected, 10)
        for number in range(5, 15):
            publisher.emit(EventKind.HEALTH, {"n": number})
        time.sleep(0.5)
        assert publisher.pending == 10
        assert cloud.store.count() == 5

        proxy.restore()
        assert _eventually(lambda: publisher.pending == 0, 30)
        publisher.close()
    finally:
        proxy.close()
    assert _eventually(lambda: cloud.store.count() == 15)
    assert [event.body["n"] for event in cloud.store.events()] == list(range(15))


def test_a_device_keeps_its_events_until_an_ingestor_subscribes(
    cloud: Cloud, root: str, tmp_path: Path
) -> None:
    publisher = _publisher(DEVICES[2], tmp_path / "device", _config(root), ack_timeout_s=2.0)
    publisher.start()
    assert publisher.wait_connected(10)
    publisher.emit(EventKind.MODEL_INSTALLED, {"model": "cnn", "version": 3})
    with pytest.raises(PublisherOffline, match="no subscriber"):
        publisher.flush()
    assert publisher.pending == 1

    cloud.start()

    assert _eventually(lambda: publisher.pending == 0, 30)
    publisher.close()
    assert _eventually(lambda: cloud.store.count() == 1)


def test_events_published_while_the_ingestor_is_down_reach_it_when_it_returns(
    cloud: Cloud, root: str, tmp_path: Path
) -> None:
    cloud.start()
    cloud.stop()  # the broker keeps the session and queues for it
    publisher = _publisher(DEVICES[0], tmp_path / "device", _config(root))
    publisher.start()
    for number in range(10):
        publisher.emit(EventKind.DRIFT, {"drifted": number % 2 == 0})
    assert _eventually(lambda: publisher.pending == 0)  # acknowledged by the broker
    publisher.close()
    assert cloud.store.count() == 0

    cloud.start()

    assert _eventually(lambda: cloud.store.count() == 10)


def test_forged_events_on_the_broker_are_rejected_and_audited(
    cloud: Cloud, root: str, tmp_path: Path
) -> None:
    cloud.start()
    honest = _publisher(DEVICES[0], tmp_path / "device", _config(root))
    honest.start()
    event = honest.emit(EventKind.HEALTH, {"error_rate": 0.0})
    assert _eventually(lambda: cloud.store.count() == 1)
    honest.close()
    attacker = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"attacker-{root}")
    attacker.connect(*BROKER)
    attacker.loop_start()
    try:
        forged = event.to_bytes().replace(b'"error_rate":0.0', b'"error_rate":1.0')
        victim = event_topic(_device_id(DEVICES[1]), root)
        for topic, payload in (
            (event_topic(event.device, root), forged),  # edited after signing
            (victim, event.to_bytes()),  # device 0's event on device 1's topic
            (event_topic(event.device, root), event.to_bytes()),  # a replay
            (event_topic(event.device, root), b"\x00garbage"),
        ):
            attacker.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        attacker.disconnect()
        attacker.loop_stop()

    assert _eventually(lambda: cloud.ingestor.stats().received == 5)
    assert cloud.store.count() == 1
    stats = cloud.ingestor.stats()
    assert stats.duplicates == 1
    assert stats.rejected == {"bad_signature": 1, "topic_mismatch": 1, "malformed": 1}
    reasons = [
        str(record.payload["reason"])
        for record in cloud.audit.iter()
        if record.kind is AuditEventKind.DEVICE_EVENTS_REJECTED
    ]
    assert sorted(reasons) == ["bad_signature", "malformed", "topic_mismatch"]


def test_events_the_database_refused_are_delivered_again_to_the_next_session(
    cloud: Cloud, root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise StorageError("database down")

    monkeypatch.setattr(cloud.store, "insert", refuse)
    cloud.start()
    publisher = _publisher(DEVICES[0], tmp_path / "device", _config(root))
    publisher.start()
    for number in range(3):
        publisher.emit(EventKind.CRASH, {"n": number})
    assert _eventually(lambda: publisher.pending == 0)  # the broker has them
    publisher.close()
    time.sleep(0.3)
    cloud.stop()  # never stored, so never acknowledged

    monkeypatch.undo()
    cloud.start()

    assert _eventually(lambda: cloud.store.count() == 3)
    assert [event.seq for event in cloud.store.events()] == [1, 2, 3]
