"""The rollout service: ingest device events from MQTT, apply the gates, publish directives.

``fedge rollout run`` runs this: an :class:`~fl_server.events.mqtt.MqttIngestService`
stores every verified device event once, a loop calls
:meth:`RolloutController.tick` every ``interval_s``, and every new signed
directive is published as a *retained* MQTT message on
``<root>/models/<model>/directive``, so a device that connects later still gets
the newest one at once. Devices verify it themselves
(:mod:`edge_runtime.directive_guard`); the broker is a courier, not a trust anchor.
"""

from __future__ import annotations

import json
import logging
import threading

import paho.mqtt.client as mqtt

from edge_runtime.mqtt_config import MqttConfig, directive_topic, mqtt_client
from edge_runtime.release import SignedDirective
from fedge.errors import FedgeError
from fl_server.events.mqtt import MqttIngestService
from fl_server.rollout.controller import RolloutController

__all__ = ["DirectivePublisher", "RolloutService"]

logger = logging.getLogger(__name__)


class DirectivePublisher:
    """Publish signed directives as retained QoS 1 messages (one MQTT connection)."""

    def __init__(self, config: MqttConfig, *, client_id: str = "fedge-rollout") -> None:
        self._config = config
        self._client: mqtt.Client = mqtt_client(config, client_id)
        self._connected = threading.Event()
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect

    def start(self) -> None:
        """Connect in the background (retrying while the broker is down)."""
        self._client.connect_async(
            self._config.host, self._config.effective_port, keepalive=self._config.keepalive_s
        )
        self._client.loop_start()

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until the broker accepted the connection."""
        return self._connected.wait(timeout_s)

    def publish(self, signed: SignedDirective, *, timeout_s: float = 10.0) -> None:
        """Publish ``signed`` on its model's topic, retained, and wait for the broker's ack."""
        topic = directive_topic(signed.directive.model, self._config.topic_root)
        payload = json.dumps(signed.to_json(), sort_keys=True).encode()
        info = self._client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(timeout_s)
        if not info.is_published():
            raise FedgeError(
                f"the broker did not acknowledge directive {signed.directive.sequence}"
            )

    def close(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, *args: object) -> None:
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, *args: object) -> None:
        self._connected.clear()


class RolloutService:
    """Run the ingestor and the controller loop until :meth:`stop`.

    Parameters
    ----------
    controller
        Applies the gates (its ``on_directive`` should publish through a
        :class:`DirectivePublisher`).
    ingest
        Stores the device events the gates read.
    interval_s
        How often the gates are applied.
    """

    def __init__(
        self, controller: RolloutController, ingest: MqttIngestService, *, interval_s: float = 5.0
    ) -> None:
        self._controller = controller
        self._ingest = ingest
        self._interval_s = interval_s
        self._stop = threading.Event()

    def run(self) -> None:
        """Ingest and tick until :meth:`stop` is called; a failing tick is logged and retried."""
        self._ingest.start()
        try:
            # Directives go out only once the ingestor's subscription holds: a device that
            # acts on one reports at once, and a report published before the subscription
            # (a first start, with no session at the broker yet) would be dropped.
            while not self._ingest.wait_subscribed(1.0):
                if self._stop.is_set():
                    return
                logger.info("rollout: waiting for the broker to grant the event subscription")
            self._republish()
            while not self._stop.is_set():
                try:
                    for record in self._controller.tick():
                        logger.info(
                            "rollout %s: %s (%s)", record.id, record.state.value, record.reason
                        )
                except FedgeError as exc:
                    logger.error("rollout: tick failed, retrying: %s", exc)
                self._stop.wait(self._interval_s)
        finally:
            self._ingest.close()

    def _republish(self) -> None:
        """Publish the newest directive of each model with a rollout (a broker may have lost it)."""
        for model in sorted({record.model for record in self._controller.rollouts()}):
            signed = self._controller.directive(model)
            if signed is not None and self._controller.on_directive is not None:
                try:
                    self._controller.on_directive(signed)
                except FedgeError as exc:
                    logger.error("rollout: cannot publish the directive of %s: %s", model, exc)

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current tick."""
        self._stop.set()
