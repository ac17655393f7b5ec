"""``fedge rollout run`` against the real broker: it ingests signed events, advances, publishes.

The service runs as a subprocess (as an operator runs it); simulated devices publish
signed health events over Mosquitto on 127.0.0.1:1883 and read the retained
directive; SIGTERM stops the service cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_runtime.device_events import EventKind, sign_event
from edge_runtime.mqtt_config import event_topic
from edge_runtime.release import SignedDirective, verify_directive
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.events.store import EventStore
from fl_server.rollout import HealthGates, RolloutController, RolloutPlan, RolloutState
from fl_server.store.cli import open_store
from fl_server.store.store import NewArtefact, VersionInfo
from secure_agg.identity import EnrolmentAuthority
from secure_agg.randomness import DeterministicRandom


def _broker_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 1883), timeout=1):
            return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(
    not _broker_answers(),
    reason="needs the Mosquitto broker on 127.0.0.1:1883 (apt-get install mosquitto)",
)

AUTHORITY = EnrolmentAuthority.generate(DeterministicRandom(11))
DEVICES = [AUTHORITY.enrol(f"dev-{n:03d}", DeterministicRandom(100 + n)) for n in range(40)]


def _start_rollout(home: Path) -> str:
    with open_store(None, None, home=home, create=True) as store:
        for tag in (b"1", b"2"):
            store.publish(
                "cnn",
                [NewArtefact(name="weights.npz", data=b"w" + tag)],
                info=VersionInfo(server_round=2, metrics={"accuracy": 0.9}),
            )
        store.tag("cnn", "production", 1)
        plan = RolloutPlan(
            stages=(0.25, 1.0), bake_s=0.0, gates=HealthGates(min_devices=3, min_labelled=50)
        )
        controller = RolloutController(
            store,
            EventStore(store.engine),
            fleet=lambda: [d.certificate.enrolment_id for d in DEVICES],
        )
        (home / "release-policy.toml").write_text("allow_manual_publish = true\n")
        return controller.start("cnn", 2, plan).id


def _wait_until_ingested(home: Path, *, health: int, drift: int, timeout_s: float = 30) -> None:
    """Wait until the service stored the events and requested retraining (or time runs out)."""
    deadline = time.monotonic() + timeout_s
    with open_store(None, None, home=home, create=False) as store:
        events = EventStore(store.engine)
        while time.monotonic() < deadline:
            stored = (
                events.count(kinds=[EventKind.HEALTH]),
                events.count(kinds=[EventKind.DRIFT]),
            )
            kinds = [e.kind for e in AuditLog(store.engine).iter()]
            if stored == (health, drift) and AuditEventKind.RETRAINING_REQUESTED in kinds:
                return
            time.sleep(0.2)


class _Directives:
    def __init__(self, topic: str) -> None:
        self.latest: SignedDirective | None = None
        self.arrived = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", 1883)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def _on_message(self, client: object, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self.arrived:
            self.latest = SignedDirective.from_json(json.loads(message.payload))
            self.arrived.notify_all()

    def wait(self, predicate: object, timeout_s: float = 30) -> SignedDirective:
        deadline = time.monotonic() + timeout_s
        with self.arrived:
            while self.latest is None or not predicate(self.latest):  # type: ignore[operator]
                left = deadline - time.monotonic()
                assert left > 0, f"no matching directive; last: {self.latest}"
                self.arrived.wait(left)
            return self.latest


def test_the_service_ingests_events_advances_and_publishes_retained_directives(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    rollout_id = _start_rollout(home)
    root = f"fedge-test/{os.getpid()}-{time.monotonic_ns()}"
    with open_store(None, None, home=home, create=False) as store:
        store_key = store.public_key
    directives = _Directives(f"{root}/models/cnn/directive")
    service = subprocess.Popen(
        [
            sys.executable, "-m", "fedge", "rollout", "run",
            "--authority-key", AUTHORITY.public_key.hex(), "--broker", "127.0.0.1:1883",
            "--plaintext", "--interval", "0.2", "--topic-root", root, "--home", str(home),
            "--drift-threshold", "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    devices = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    devices.connect("127.0.0.1", 1883)
    devices.loop_start()
    try:
        # The service republishes the running rollout's directive when it starts.
        first = directives.wait(lambda s: s.directive.rollout_id == rollout_id)
        assert verify_directive(first, store_key).cohort_fraction < 1.0
        canary = {d.certificate.enrolment_id for d in DEVICES if first.directive.targets(
            d.certificate.enrolment_id)}  # fmt: skip
        assert len(canary) == 10  # exactly 25 % of the 40 devices
        for identity in DEVICES:
            device = identity.certificate.enrolment_id
            body = {
                "model": "cnn",
                "version": 2 if device in canary else 1,
                "inferences": 100,
                "errors": 0,
                "labelled": 100,
                "correct": 90,
                "latency_p95_ms": 2.0,
            }
            event = sign_event(identity, seq=1, kind=EventKind.HEALTH, body=body, time=time.time())
            devices.publish(event_topic(device, root), event.to_bytes(), qos=1).wait_for_publish(5)

        # A quarter of the fleet sees drifted inputs: a retraining request, once.
        for identity in DEVICES[:10]:
            device = identity.certificate.enrolment_id
            body = {"model": "cnn", "version": 1, "drifted": True}
            event = sign_event(identity, seq=2, kind=EventKind.DRIFT, body=body, time=time.time())
            devices.publish(event_topic(device, root), event.to_bytes(), qos=1).wait_for_publish(5)

        final = directives.wait(lambda s: s.directive.cohort_fraction == 1.0)
        assert verify_directive(final, store_key).version == 2
        assert final.directive.sequence == first.directive.sequence + 1
        # The gates can pass before the last control reports are stored: let the service
        # ingest everything (and react to the drift) before it is stopped.
        _wait_until_ingested(home, health=40, drift=10)
    finally:
        devices.loop_stop()
        directives.client.loop_stop()
        service.send_signal(signal.SIGTERM)
        _, stderr = service.communicate(timeout=20)
    assert service.returncode == 0, stderr
    with open_store(None, None, home=home, create=False) as store:
        controller = RolloutController(store, EventStore(store.engine))
        assert controller.get(rollout_id).stage == 1
        assert controller.get(rollout_id).state is RolloutState.RUNNING
        assert EventStore(store.engine).count(kinds=[EventKind.HEALTH]) == 40
        kinds = [e.kind for e in AuditLog(store.engine).iter()]
        assert kinds.count(AuditEventKind.RETRAINING_REQUESTED) == 1
