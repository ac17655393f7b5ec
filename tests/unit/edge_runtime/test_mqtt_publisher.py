"""The MQTT configuration and topics, and the publisher's outbox and acks, without a broker."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edge_runtime.device_events import EventKind, parse_event, verify_event
from edge_runtime.mqtt_config import (
    MqttConfig,
    device_of_topic,
    event_topic,
    event_topic_filter,
    is_loopback,
)
from edge_runtime.mqtt_publisher import EventPublisher, PublisherOffline
from fedge.errors import ConfigError
from secure_agg.identity import EnrolmentAuthority
from secure_agg.randomness import DeterministicRandom

AUTHORITY = EnrolmentAuthority.generate(DeterministicRandom(1))
DEVICE = "dev-00000000000000aa"
IDENTITY = AUTHORITY.enrol(DEVICE, DeterministicRandom(2))
LOCAL = MqttConfig(host="127.0.0.1", port=1883, tls=False, topic_root="unit")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost"])
def test_plaintext_is_allowed_to_a_loopback_broker(host: str) -> None:
    config = MqttConfig(host=host, tls=False)

    assert is_loopback(host)
    assert config.effective_port == 1883
    assert config.tls_context() is None


def test_plaintext_to_another_host_needs_the_test_flag() -> None:
    with pytest.raises(ConfigError, match="needs TLS"):
        MqttConfig(host="broker.example.com", tls=False)

    config = MqttConfig(host="broker.example.com", tls=False, insecure_plaintext_for_tests=True)
    assert config.describe() == "broker.example.com:1883 (plaintext)"


def test_tls_is_the_default_on_port_8883() -> None:
    config = MqttConfig(host="broker.example.com")

    context = config.tls_context()

    assert config.effective_port == 8883
    assert context is not None
    assert context.check_hostname


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"host": ""}, "host must be"),
        ({"host": "a b"}, "host must be"),
        ({"port": 0}, "port must be"),
        ({"port": 70000}, "port must be"),
        ({"port": "1883"}, "port must be"),
        ({"tls": "yes"}, "tls must be a bool"),
        ({"tls": False, "host": "127.0.0.1", "ca_file": Path("ca.pem")}, "need tls=True"),
        ({"cert_file": Path("c.pem")}, "go together"),
        ({"password_file": Path("p")}, "needs a username"),
        ({"username": ""}, "username must have"),
        ({"keepalive_s": 1}, "keepalive_s"),
        ({"client_id": "a/b"}, "client_id"),
        ({"topic_root": "a/+"}, "topic_root"),
        ({"topic_root": ""}, "topic_root"),
    ],
)
def test_the_configuration_refuses_bad_values(fields: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"host": "broker.example.com", **fields}

    with pytest.raises(ConfigError, match=message):
        MqttConfig(**arguments)  # type: ignore[arg-type]


def test_unreadable_tls_files_are_a_config_error(tmp_path: Path) -> None:
    config = MqttConfig(host="broker.example.com", ca_file=tmp_path / "missing.pem")

    with pytest.raises(ConfigError, match="cannot load the MQTT TLS files"):
        config.tls_context()


def test_the_password_comes_from_a_private_file_and_is_never_shown(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_bytes(b"s3cret-value\n")
    secret.chmod(0o600)
    config = MqttConfig(host="broker.example.com", username=DEVICE, password_file=secret)

    assert config.password() == "s3cret-value"
    assert "s3cret" not in repr(config)
    assert "s3cret" not in config.describe()
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="accessible to group or others"):
        config.password()


# --- topics -----------------------------------------------------------------------------


def test_topics_name_the_device_and_parse_back() -> None:
    topic = event_topic(DEVICE)

    assert topic == f"fedge/devices/{DEVICE}/events"
    assert device_of_topic(topic) == DEVICE
    assert event_topic_filter("t/1") == "t/1/devices/+/events"
    for other in ("fedge/devices//events", "fedge/devices/a/b/events", "x/devices/a/events"):
        assert device_of_topic(other) is None


# --- the publisher, offline -------------------------------------------------------------


def test_the_publisher_needs_its_device_id_as_client_id(tmp_path: Path) -> None:
    config = MqttConfig(host="127.0.0.1", tls=False, client_id="dev-someone-else")

    with pytest.raises(ConfigError, match="device id as MQTT client id"):
        EventPublisher(config, IDENTITY, tmp_path)


@pytest.mark.parametrize(
    ("name", "value"),
    [("batch_size", 0), ("max_buffered", 0), ("ack_timeout_s", 0.0), ("flush_interval_s", -1.0)],
)
def test_the_publisher_checks_its_numbers(tmp_path: Path, name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=name):
        EventPublisher(LOCAL, IDENTITY, tmp_path, **{name: value})  # type: ignore[arg-type]


def test_events_emitted_while_the_broker_is_unreachable_stay_buffered_across_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = tmp_path / "password"
    secret.write_bytes(b"hunter2-secret")
    secret.chmod(0o600)
    config = MqttConfig(
        host="127.0.0.1",
        port=_closed_port(),
        tls=False,
        username=DEVICE,
        password_file=secret,
        topic_root="unit",
    )
    publisher = EventPublisher(config, IDENTITY, tmp_path / "events", flush_interval_s=0.05)
    with caplog.at_level(logging.DEBUG):
        publisher.start()
        emitted = [publisher.emit(EventKind.HEALTH, {"n": n}) for n in range(5)]
        assert not publisher.wait_connected(0.3)
        with pytest.raises(PublisherOffline, match="not connected"):
            publisher.flush()
        publisher.close(drain_timeout_s=0.1)

    reopened = EventPublisher(config, IDENTITY, tmp_path / "events")
    assert [event.seq for event in emitted] == [1, 2, 3, 4, 5]
    assert reopened.pending == 5
    assert reopened.emit(EventKind.CRASH, {}).seq == 65  # after the reserved lease
    assert "hunter2" not in caplog.text


# --- the publisher's acknowledgement rules, with a stand-in paho client --------------------


class FakeClient:
    """Answers each publish at once with the reason code ``answer(mid)`` (None: no answer)."""

    def __init__(self, publisher: EventPublisher, answer: Callable[[int], int | None]) -> None:
        self.publisher = publisher
        self.answer = answer
        self.sent: list[bytes] = []

    def publish(self, topic: str, payload: bytes, qos: int) -> SimpleNamespace:
        assert topic == self.publisher.topic
        assert qos == 1
        self.sent.append(payload)
        mid = len(self.sent)
        code = self.answer(mid)
        if code is not None:
            reason = ReasonCode(PacketTypes.PUBACK, identifier=code)
            self.publisher._on_publish(None, None, mid, reason, None)  # type: ignore[arg-type]
        return SimpleNamespace(rc=MQTTErrorCode.MQTT_ERR_SUCCESS, mid=mid)


def _wired(
    tmp_path: Path, answer: Callable[[int], int | None], **options: int
) -> tuple[EventPublisher, FakeClient]:
    publisher = EventPublisher(LOCAL, IDENTITY, tmp_path, ack_timeout_s=0.2, **options)  # type: ignore[arg-type]
    fake = FakeClient(publisher, answer)
    publisher._client = fake  # type: ignore[assignment]
    publisher._connected.set()
    return publisher, fake


def test_a_batch_leaves_the_outbox_only_once_every_message_is_acknowledged(
    tmp_path: Path,
) -> None:
    publisher, fake = _wired(tmp_path, lambda mid: 0x00, batch_size=2)
    for n in range(5):
        publisher.emit(EventKind.TELEMETRY, {"n": n})

    assert publisher.flush() == 5

    assert publisher.pending == 0
    events = [parse_event(payload) for payload in fake.sent]
    assert [event.seq for event in events] == [1, 2, 3, 4, 5]
    for event in events:
        verify_event(event, authority_public_key=AUTHORITY.public_key, now=1)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (0x10, "no subscriber"),
        (0x87, "refused 1 messages"),
        (None, "not acknowledged"),
    ],
)
def test_a_refused_or_unanswered_message_keeps_its_batch_buffered(
    tmp_path: Path, code: int | None, message: str
) -> None:
    publisher, fake = _wired(tmp_path, lambda mid: 0x00 if mid != 3 else code, batch_size=2)
    for n in range(4):
        publisher.emit(EventKind.HEALTH, {"n": n})

    with pytest.raises(PublisherOffline, match=message):
        publisher.flush()

    assert publisher.pending == 2  # the first batch went; the second stays whole
    fake.answer = lambda mid: 0x00
    assert publisher.flush() == 2
    assert [parse_event(payload).seq for payload in fake.sent[-2:]] == [3, 4]


def test_events_dropped_by_a_full_outbox_are_reported_as_a_signed_event(tmp_path: Path) -> None:
    publisher, fake = _wired(tmp_path, lambda mid: None, max_buffered=3)
    for n in range(5):
        publisher.emit(EventKind.TELEMETRY, {"n": n})
    with pytest.raises(PublisherOffline):
        publisher.flush()
    first_report = parse_event(fake.sent[0])

    fake.answer = lambda mid: 0x00
    publisher.flush()

    retried_report = parse_event(fake.sent[4])  # the same report, not a new number
    assert first_report == retried_report
    assert first_report.kind is EventKind.EVENTS_DROPPED
    assert first_report.body == {"count": 2}
    assert first_report.seq == 6
    assert [parse_event(payload).seq for payload in fake.sent[5:]] == [3, 4, 5]
    assert publisher.pending == 0
