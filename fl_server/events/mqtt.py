"""Subscribe to every device's event topic and feed an :class:`EventIngestor`, acking after commit.

:class:`MqttIngestService` connects to the broker with a persistent MQTT 5 session
(fixed client id, ``clean_start=False``, a session expiry), subscribes to
``<root>/devices/+/events`` with QoS 1 and hands each delivered message to a worker
thread, which ingests whatever has arrived as one batch (one database transaction)
and only then acknowledges the batch's messages, in the order they arrived.

Notes
-----
Acknowledging after the commit makes the path from a device's outbox to the
database at least once end to end: a message the ingestor received but did not
store (a crash, a database outage) is not acknowledged, so the broker delivers it
again on the next connection, and the store drops what it already holds. While
the ingestor is away the broker queues its session's messages; Mosquitto keeps at
most ``max_queued_messages`` (1000 by default) per session and drops the rest, so a
deployment raises that limit (see docs/device-events.md). ``receive_maximum`` is how
many unacknowledged messages the broker may have in flight towards the ingestor;
a batch is at most that large.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_runtime.mqtt_config import (
    MqttConfig,
    event_topic_filter,
    mqtt_client,
    start_connecting,
)
from fedge.errors import ConfigError, StorageError
from fl_server.events.ingest import EventIngestor

__all__ = ["DEFAULT_INGESTOR_CLIENT_ID", "MqttIngestService"]

logger = logging.getLogger(__name__)

DEFAULT_INGESTOR_CLIENT_ID = "fedge-ingestor"
_RETRY_S = 1.0

_Message = tuple[str, bytes, int, int, int]  # topic, payload, mid, qos, connection


class MqttIngestService:
    """Run an :class:`EventIngestor` on the messages of a broker.

    Parameters
    ----------
    config
        The broker; ``config.client_id`` names the persistent session
        (``fedge-ingestor`` when ``None``) and ``config.topic_root`` the topics.
    ingestor
        Verifies and stores the events.
    session_expiry_s
        How long the broker keeps the session (and queues messages) while the
        ingestor is disconnected, 0..2**32-1.
    receive_maximum
        Unacknowledged messages the broker may send at once, 1..65535.
    audit_flush_s
        How often an idle worker writes the rejection summary of a finished window.

    Raises
    ------
    ConfigError
        If a number is out of range, or the ingestor expects another topic root.
    """

    def __init__(
        self,
        config: MqttConfig,
        ingestor: EventIngestor,
        *,
        session_expiry_s: int = 86_400,
        receive_maximum: int = 1_000,
        audit_flush_s: float = 5.0,
    ) -> None:
        if type(session_expiry_s) is not int or not 0 <= session_expiry_s < 2**32:
            raise ConfigError(f"session_expiry_s must be in 0..2**32-1, got {session_expiry_s!r}")
        if type(receive_maximum) is not int or not 1 <= receive_maximum <= 65_535:
            raise ConfigError(f"receive_maximum must be in 1..65535, got {receive_maximum!r}")
        if not isinstance(audit_flush_s, int | float) or not audit_flush_s > 0:
            raise ConfigError(f"audit_flush_s must be > 0, got {audit_flush_s!r}")
        if ingestor.topic_root != config.topic_root:
            raise ConfigError(
                f"the ingestor checks topics under {ingestor.topic_root!r} but the broker "
                f"configuration subscribes under {config.topic_root!r}"
            )
        self._config = config
        self._ingestor = ingestor
        self._client_id = config.client_id or DEFAULT_INGESTOR_CLIENT_ID
        self._filter = event_topic_filter(config.topic_root)
        self._session_expiry_s = session_expiry_s
        self._receive_maximum = receive_maximum
        self._audit_flush_s = float(audit_flush_s)
        self._queue: queue.Queue[_Message | None] = queue.Queue()  # None wakes the worker
        self._client: mqtt.Client | None = None
        self._subscribed = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._batches = 0
        self._connection = 0  # message ids are only meaningful on the connection they came on

    @property
    def ingestor(self) -> EventIngestor:
        """The ingestor messages are fed to."""
        return self._ingestor

    @property
    def batches(self) -> int:
        """How many batches were committed."""
        return self._batches

    def start(self) -> None:
        """Connect (retrying in the background), subscribe and start ingesting.

        Raises
        ------
        ConfigError
            If the TLS or password files cannot be used.
        """
        if self._client is not None:
            return
        client = mqtt_client(self._config, self._client_id, manual_ack=True)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        start_connecting(
            client,
            self._config,
            clean_start=False,
            session_expiry_s=self._session_expiry_s,
            receive_maximum=self._receive_maximum,
        )
        self._client = client
        self._worker = threading.Thread(target=self._run, name="event-ingestor", daemon=True)
        self._worker.start()
        client.loop_start()
        logger.info(
            "event ingestor %s connecting to %s for %s",
            self._client_id,
            self._config.describe(),
            self._filter,
        )

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Wait until the subscription is granted; return whether it is."""
        return self._subscribed.wait(timeout_s)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every delivered message is ingested and acknowledged (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return self._queue.unfinished_tasks == 0

    def close(self, *, end_session: bool = False) -> None:
        """Stop: finish the batch in hand, disconnect, write the pending rejection summary.

        Messages received but not ingested are not acknowledged: the broker delivers
        them again to the next session. ``end_session`` asks the broker to drop the
        session (tests; a deployment keeps it so nothing published meanwhile is lost).
        """
        self._stop.set()
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        if self._client is not None:
            properties = None
            if end_session:
                properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
                properties.SessionExpiryInterval = 0
            self._client.disconnect(properties=properties)
            self._client.loop_stop()
            self._client = None
        self._subscribed.clear()
        self._ingestor.rejections.close()

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            logger.error("broker %s refused the ingestor: %s", self._config.describe(), reason_code)
            return
        self._connection += 1
        logger.info("event ingestor connected (session present: %s)", flags.session_present)
        client.subscribe(self._filter, qos=1)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if reason_codes and not reason_codes[0].is_failure and reason_codes[0].value == 1:
            self._subscribed.set()
        else:
            logger.error(
                "the broker refused the subscription to %s: %s", self._filter, reason_codes
            )

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._subscribed.clear()
        if not self._stop.is_set():
            logger.warning("event ingestor disconnected: %s", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = ""  # not an event topic: refused as malformed
        self._queue.put((topic, bytes(message.payload), message.mid, message.qos, self._connection))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=self._audit_flush_s)
            except queue.Empty:
                self._ingestor.rejections.flush()
                continue
            batch: list[_Message] = []
            item, taken = first, 1
            while True:
                if item is not None:
                    batch.append(item)
                if len(batch) >= self._receive_maximum:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                taken += 1
            if batch:
                self._ingest(batch)
            for _ in range(taken):
                self._queue.task_done()
            self._ingestor.rejections.flush()

    def _ingest(self, batch: list[_Message]) -> None:
        messages = [(topic, payload) for topic, payload, _, _, _ in batch]
        while True:
            try:
                self._ingestor.ingest_many(messages)
                break
            except StorageError as error:
                # Unacknowledged, the batch stays the broker's; retry while running.
                logger.error("cannot store %d device events, retrying: %s", len(batch), error)
                if self._stop.wait(_RETRY_S):
                    return
            except Exception:  # a bug: leave the batch unacknowledged, keep serving
                logger.exception("cannot ingest %d device events", len(batch))
                return
        self._batches += 1
        client = self._client
        if client is None:
            return
        for _, _, mid, qos, connection in batch:
            # After a reconnection the broker re-sends what was not acknowledged, under
            # ids that may now name other messages: acknowledge only on the same connection.
            if qos > 0 and connection == self._connection:
                client.ack(mid, qos)
