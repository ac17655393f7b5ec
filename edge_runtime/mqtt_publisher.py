"""Publish a device's signed events over MQTT from a durable outbox; nothing is lost offline.

:meth:`EventPublisher.emit` signs an event (:mod:`edge_runtime.device_events`) with
the device's enrolment identity, gives it the next sequence number and appends it
to an on-disk outbox (a :class:`~edge_runtime.telemetry.TelemetryBuffer`, fsynced)
before it returns; a background thread publishes the outbox oldest first to
``<root>/devices/<device id>/events`` with QoS 1 and forgets a batch only once the
broker acknowledged every message in it::

    publisher = EventPublisher(config, identity, Path("/var/lib/fedge/events"))
    publisher.start()
    publisher.emit(EventKind.HEALTH, {"error_rate": 0.01, "p95_ms": 3.2})
    ...
    publisher.close()

Notes
-----
MQTT 5 is used so that a PUBACK carries a reason code: a message the broker refuses
(not authorised by its ACL, quota exceeded) or has no subscriber for (``No matching
subscribers``: the cloud's ingestor holds no session, so the broker would discard it)
stays in the outbox and is sent again later. Delivery is therefore at least once:
a batch cut by a disconnection is sent again whole, and the cloud drops what it
already has by (device, seq).

The outbox is bounded (``max_buffered`` events); when a long outage fills it the
oldest events are dropped and the count is published as an ``events_dropped`` event
when the link is back. The connection settings (TLS, credentials) are
:class:`~edge_runtime.mqtt_config.MqttConfig`'s.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_runtime._json import canonical_bytes
from edge_runtime.device_events import (
    EVENT_FORMAT,
    DeviceEvent,
    EventKind,
    EventSequence,
    sign_event,
)
from edge_runtime.mqtt_config import MqttConfig, event_topic, mqtt_client, start_connecting
from edge_runtime.telemetry import DROPPED_EVENT_KIND, TelemetryBuffer, TelemetryOffline
from fedge.errors import ConfigError, FedgeError
from secure_agg.identity import NodeIdentity

__all__ = ["EventPublisher", "PublisherOffline"]

logger = logging.getLogger(__name__)

_SUCCESS = 0x00
_NO_MATCHING_SUBSCRIBERS = 0x10
_MAX_INFLIGHT = 20


class PublisherOffline(FedgeError, ConnectionError):  # noqa: N818 - reads as what happened
    """The broker is not reachable or did not accept a batch; every unsent event stays buffered."""


class _BatchFailed(Exception):  # noqa: N818 - control flow inside this module only
    """One batch was not acknowledged in full; TelemetryBuffer keeps it."""


class EventPublisher:
    """A device's MQTT publisher of signed events, backed by a durable outbox.

    Parameters
    ----------
    config
        The broker; ``config.client_id`` must be ``None`` or the device id.
    identity
        The device's enrolment identity; it signs every event.
    directory
        Where the outbox (``outbox/``) and the sequence (``sequence.json``) live;
        reopening it resumes both.
    max_buffered
        Most events the outbox keeps while offline; the oldest are dropped beyond.
    batch_size
        Events published before waiting for their acknowledgements.
    ack_timeout_s
        How long a batch may wait for its acknowledgements.
    flush_interval_s
        How often the background thread retries while events are buffered.
    clock
        Unix seconds for the events' ``time`` field.

    Raises
    ------
    ConfigError
        If a value is out of range or ``config.client_id`` names another device.
    StorageError
        If the outbox or the sequence cannot be opened.
    """

    def __init__(
        self,
        config: MqttConfig,
        identity: NodeIdentity,
        directory: Path,
        *,
        max_buffered: int = 10_000,
        batch_size: int = 100,
        ack_timeout_s: float = 10.0,
        flush_interval_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(identity, NodeIdentity):
            raise ConfigError("identity must be a secure_agg.identity.NodeIdentity")
        device = identity.certificate.enrolment_id
        if config.client_id not in (None, device):
            raise ConfigError(
                f"a device publishes with its device id as MQTT client id, not {config.client_id!r}"
            )
        for name, value in (("batch_size", batch_size), ("max_buffered", max_buffered)):
            if type(value) is not int or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r:.40}")
        for name, number in (
            ("ack_timeout_s", ack_timeout_s),
            ("flush_interval_s", flush_interval_s),
        ):
            if not isinstance(number, int | float) or not math.isfinite(number) or number <= 0:
                raise ConfigError(f"{name} must be a finite number > 0, got {number!r:.40}")
        self._config = config
        self._identity = identity
        self._device = device
        self._topic = event_topic(device, config.topic_root)
        self._batch_size = batch_size
        self._ack_timeout_s = float(ack_timeout_s)
        self._flush_interval_s = float(flush_interval_s)
        self._clock = clock
        directory = Path(directory)
        self._outbox = TelemetryBuffer(
            directory / "outbox", max_records=max_buffered, segment_records=1_000
        )
        self._sequence = EventSequence(directory / "sequence.json", device)
        self._drop_report: tuple[int, DeviceEvent] | None = None
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._acks: dict[int, int] = {}  # mid -> PUBACK reason code
        self._acks_changed = threading.Condition()
        self._flush_lock = threading.Lock()
        self._signal = threading.Condition()
        self._kicked = False  # events were appended
        self._relinked = False  # the connection came (back) up
        self._backing_off = False  # the last flush failed: wait, whatever is appended
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def device(self) -> str:
        """The device id this publisher signs and publishes for."""
        return self._device

    @property
    def topic(self) -> str:
        """The topic this publisher publishes on."""
        return self._topic

    @property
    def pending(self) -> int:
        """How many events wait in the outbox."""
        return len(self._outbox)

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up."""
        return self._connected.is_set()

    def emit(self, kind: EventKind, body: dict[str, Any]) -> DeviceEvent:
        """Sign an event, append it durably to the outbox and return it (no network).

        Raises
        ------
        EventMalformed
            If the body is not a small plain JSON object.
        StorageError
            If the sequence or the outbox cannot be written; the event is not kept.
        """
        event = sign_event(
            self._identity, seq=self._sequence.next(), kind=kind, body=body, time=self._clock()
        )
        self._outbox.append(event.to_json())
        with self._signal:
            self._kicked = True
            self._signal.notify_all()
        return event

    # --- connection ------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (retrying while the broker is down) and publish as it can.

        Raises
        ------
        ConfigError
            If the TLS or password files cannot be used.
        """
        if self._thread is not None:
            return
        client = mqtt_client(self._config, self._device)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        # paho ignores the Receive Maximum a broker announces (MQTT 5, 3.2.2.3.3), so stay
        # within Mosquitto's default of 20 unacknowledged messages per client.
        client.max_inflight_messages_set(min(self._batch_size, _MAX_INFLIGHT))
        start_connecting(client, self._config, clean_start=True)
        self._client = client
        client.loop_start()
        self._thread = threading.Thread(
            target=self._run, name=f"event-publisher-{self._device}", daemon=True
        )
        self._thread.start()
        logger.info("event publisher of %s connecting to %s", self._device, self._config.describe())

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until the broker connection is up; return whether it is."""
        return self._connected.wait(timeout_s)

    def close(self, *, drain_timeout_s: float = 0.0) -> None:
        """Stop publishing; with ``drain_timeout_s``, try one flush first. Unsent events stay."""
        if drain_timeout_s > 0 and self._connected.wait(drain_timeout_s):
            try:
                self.flush()
            except PublisherOffline as error:
                logger.info("event publisher closing with events buffered: %s", error)
        self._stop.set()
        with self._signal:
            self._signal.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
        self._connected.clear()

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            logger.error(
                "broker %s refused device %s: %s",
                self._config.describe(),
                self._device,
                reason_code,
            )
            return
        logger.info("event publisher of %s connected", self._device)
        self._connected.set()
        with self._signal:
            self._relinked = True
            self._signal.notify_all()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._connected.is_set():
            logger.warning("event publisher of %s disconnected: %s", self._device, reason_code)
        self._connected.clear()
        with self._acks_changed:
            self._acks_changed.notify_all()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        with self._acks_changed:
            self._acks[mid] = reason_code.value
            self._acks_changed.notify_all()

    # --- publishing ------------------------------------------------------------------

    def flush(self) -> int:
        """Publish every buffered event now; return how many left the outbox.

        Raises
        ------
        PublisherOffline
            If the broker is not connected, or a batch was not acknowledged in
            full in time; what was not acknowledged stays buffered.
        StorageError
            If recording a sent batch fails; that batch will be sent again.
        """
        with self._flush_lock:
            if self._client is None or not self._connected.is_set():
                raise PublisherOffline(
                    f"not connected to {self._config.describe()}; {self.pending} events buffered"
                )
            try:
                return self._outbox.flush(self._send, batch_size=self._batch_size)
            except TelemetryOffline as error:
                raise PublisherOffline(
                    f"{error.sent} events published, {error.remaining} stay buffered: "
                    f"{error.__cause__}"
                ) from error

    def _dropped_event(self, count: int) -> DeviceEvent:
        # The same report (same seq) is re-sent until a batch holding it is acknowledged.
        if self._drop_report is not None and self._drop_report[0] == count:
            return self._drop_report[1]
        event = sign_event(
            self._identity,
            seq=self._sequence.next(),
            kind=EventKind.EVENTS_DROPPED,
            body={"count": count},
            time=self._clock(),
        )
        self._drop_report = (count, event)
        return event

    def _payload(self, document: dict[str, Any]) -> bytes:
        if document.get("format") != EVENT_FORMAT and document.get("kind") == DROPPED_EVENT_KIND:
            return self._dropped_event(int(document["count"])).to_bytes()
        return canonical_bytes(document)

    def _send(self, batch: list[dict[str, Any]]) -> None:
        client = self._client
        if client is None or not self._connected.is_set():
            raise _BatchFailed("not connected")
        with self._acks_changed:
            self._acks.clear()
        mids: list[int] = []
        for document in batch:
            info = client.publish(self._topic, self._payload(document), qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise _BatchFailed(f"publish failed: {mqtt.error_string(info.rc)}")
            mids.append(info.mid)
        deadline = time.monotonic() + self._ack_timeout_s
        with self._acks_changed:
            while not all(mid in self._acks for mid in mids):
                left = deadline - time.monotonic()
                if left <= 0 or not self._connected.is_set():
                    raise _BatchFailed(
                        f"{sum(mid not in self._acks for mid in mids)} of {len(mids)} "
                        "messages not acknowledged"
                    )
                self._acks_changed.wait(left)
            codes = [self._acks.pop(mid) for mid in mids]
        refused = [code for code in codes if code != _SUCCESS]
        if refused:
            if _NO_MATCHING_SUBSCRIBERS in refused:
                raise _BatchFailed("the broker has no subscriber (is the cloud ingestor running?)")
            raise _BatchFailed(
                f"the broker refused {len(refused)} messages (reason code {refused[0]:#04x}: "
                "is this device allowed to publish on its topic?)"
            )
        if any(document.get("format") != EVENT_FORMAT for document in batch):
            self._drop_report = None  # delivered

    def _ready(self) -> bool:
        return self._stop.is_set() or self._relinked or (self._kicked and not self._backing_off)

    def _run(self) -> None:
        delay = self._flush_interval_s
        while True:
            with self._signal:
                self._signal.wait_for(self._ready, timeout=delay)
                if self._stop.is_set():
                    return
                if self._relinked:
                    self._backing_off = False
                self._kicked = self._relinked = False
            if not self._connected.is_set() or not (self.pending or self._outbox.dropped):
                delay, self._backing_off = self._flush_interval_s, False
                continue
            try:
                self.flush()
                delay, self._backing_off = self._flush_interval_s, False
            except PublisherOffline as error:
                logger.info("event publisher of %s: %s", self._device, error)
                # New events do not end the wait: the link, not the outbox, is the problem.
                delay = min(delay * 2, 60.0) if self._backing_off else self._flush_interval_s
                self._backing_off = True
            except FedgeError as error:  # a failed outbox write: log, keep running
                logger.error("event publisher of %s: %s", self._device, error)
