"""The canary rollout scenario: a simulated fleet on the real MQTT broker, a good and a bad variant.

What is real: the store (signed versions), the rollout controller and its
database, the signed release directives (retained MQTT messages each device
verifies with its own pinned key, sequence history and cohort bucket), every
device's enrolment identity and its signed health events published over the
broker with QoS 1, the ingestor that verifies and stores them once, and ONNX
Runtime inference of each device's current version on its own labelled images.
What is simulated: a device is an object in this process (one ORT session per
version is shared, and a few MQTT connections carry the events of many
devices), and installing a version is a pointer change rather than a download
(``fedge client models sync`` exercises the download path in the tests).

The story: production runs the FP32 CNN (v1). A good INT8 variant (v2) is rolled
out in stages and reaches the whole fleet. A bad INT8 variant (v3, calibrated
on the wrong data: its activation ranges saturate on real inputs) is rolled out
next; the canary cohort reports its accuracy, the gates compare it with the
control group still on v2, and the controller rolls the fleet back on its own.
No more than the canary fraction (minus opted-out devices) ever runs v3.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_runtime.device_events import EventKind, sign_event
from edge_runtime.directive_guard import Action, DirectiveGuard, DirectiveRefused
from edge_runtime.manifest import ArtefactFormat, Precision
from edge_runtime.mqtt_config import MqttConfig, directive_topic, event_topic, mqtt_client
from edge_runtime.release import SignedDirective
from fedge.errors import ConfigError
from secure_agg.identity import EnrolmentAuthority, NodeIdentity
from secure_agg.randomness import SystemRandomSource
from simulations.data import FashionMNIST
from simulations.rollout_models import RolloutModels, prepare_models

__all__ = ["RolloutOutcome", "RolloutScenario", "ScenarioResult", "run_rollout_scenario"]

logger = logging.getLogger(__name__)

MODEL = "cnn-rollout"


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutScenario:
    """The scenario's size and timing."""

    devices: int = 1_000
    stages: tuple[float, ...] = (0.01, 0.10, 0.50, 1.0)
    bake_s: float = 2.0
    images_per_device: int = 30
    opted_out_fraction: float = 0.05
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    connections: int = 4
    timeout_s: float = 300.0
    seed: int = 0
    train_examples: int = 6_000

    def __post_init__(self) -> None:
        if type(self.devices) is not int or self.devices < 20:
            raise ConfigError(f"devices must be an int >= 20, got {self.devices!r}")
        if type(self.images_per_device) is not int or self.images_per_device < 1:
            raise ConfigError("images_per_device must be an int >= 1")
        if not 0 <= self.opted_out_fraction < 0.5:
            raise ConfigError("opted_out_fraction must be in [0, 0.5)")
        if type(self.connections) is not int or not 1 <= self.connections <= 64:
            raise ConfigError("connections must be an int in 1..64")
        if not self.bake_s >= 0 or not self.timeout_s > 0:
            raise ConfigError("bake_s must be >= 0 and timeout_s > 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutOutcome:
    """How one rollout ended."""

    rollout_id: str
    version: int
    state: str
    stage_reached: int
    fraction_reached: float
    seconds: float
    exposed_devices: int
    max_exposed_fraction: float
    seconds_to_rollback: float | None
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        """Return the outcome as JSON values."""
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True, kw_only=True)
class ScenarioResult:
    """Both rollouts, the models' accuracies and what the ingestor saw."""

    devices: int
    opted_out: int
    good: RolloutOutcome
    bad: RolloutOutcome
    accuracy: dict[str, float]
    events_published: int
    events_stored: int
    events_rejected: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """Return the result as JSON values."""
        return {
            "devices": self.devices,
            "opted_out": self.opted_out,
            "good": self.good.to_json(),
            "bad": self.bad.to_json(),
            "accuracy": self.accuracy,
            "events_published": self.events_published,
            "events_stored": self.events_stored,
            "events_rejected": self.events_rejected,
            "seconds": self.seconds,
        }


@dataclass
class _Device:
    identity: NodeIdentity
    guard: DirectiveGuard
    version: int = 1
    seq: int = 0

    @property
    def id(self) -> str:
        return self.identity.certificate.enrolment_id


@dataclass
class _Directives:
    """The newest retained directive, as one subscriber connection receives it."""

    latest: bytes | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_message(self, client: object, userdata: object, message: Any) -> None:
        with self.lock:
            self.latest = bytes(message.payload)

    def read(self) -> SignedDirective | None:
        with self.lock:
            payload = self.latest
        return None if payload is None else SignedDirective.from_json(json.loads(payload))

    def wait_for(self, sequence: int, timeout_s: float = 10.0) -> None:
        """Wait until the broker delivered directive ``sequence`` (or a newer one)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            latest = self.read()
            if latest is not None and latest.directive.sequence >= sequence:
                return
            time.sleep(0.01)
        raise ConfigError(f"the broker did not deliver directive {sequence} in {timeout_s} s")


class _Sessions:
    """One ONNX Runtime session per version (shared by the simulated devices)."""

    def __init__(self, paths: dict[int, Path]) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self._sessions = {
            version: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for version, path in paths.items()
        }

    def infer(self, version: int, images: npt.NDArray[np.float32]) -> tuple[np.ndarray, float]:
        session = self._sessions[version]
        started = time.perf_counter()
        (logits,) = session.run(None, {session.get_inputs()[0].name: images})
        per_image_ms = 1000 * (time.perf_counter() - started) / len(images)
        return np.asarray(logits), per_image_ms


def _publish_versions(store: Any, models: RolloutModels) -> None:
    from fl_server.store.store import NewArtefact, VersionInfo

    def publish(path: Path, precision: Precision, accuracy: float, parent: int | None) -> None:
        store.publish(
            MODEL,
            [
                NewArtefact(
                    name="model.onnx",
                    data=path,
                    format=ArtefactFormat.ONNX,
                    precision=precision,
                    quality={"accuracy": accuracy},
                )
            ],
            parent=parent,
            info=VersionInfo(server_round=1, metrics={"accuracy": accuracy}),
        )

    accuracy = models.accuracy
    publish(models.fp32, Precision.FP32, accuracy["fp32"], None)
    publish(models.good_int8, Precision.INT8, accuracy["good_int8"], 1)
    # The broken pipeline measured v3 on the same wrongly preprocessed data it was
    # calibrated on, so the store's number looks fine: only the field can tell.
    publish(models.bad_int8, Precision.INT8, accuracy["bad_int8_as_published"], 2)
    store.tag(MODEL, "production", 1)


class _Run:
    """The fleet, the broker connections and the controller of one scenario run."""

    def __init__(
        self,
        config: RolloutScenario,
        workdir: Path,
        data: FashionMNIST,
        progress: Callable[[str], None],
    ) -> None:
        self.config, self.workdir, self.progress = config, workdir, progress
        self.models = prepare_models(
            data, workdir / "models", train_examples=config.train_examples, seed=config.seed
        )
        self.sessions = _Sessions(
            {1: self.models.fp32, 2: self.models.good_int8, 3: self.models.bad_int8}
        )
        self.authority = EnrolmentAuthority.generate(SystemRandomSource())
        self.published = 0
        # A fresh topic root and client ids per run: the retained directives of an earlier
        # run stay apart, and two runs on one broker never take over each other's sessions.
        self.token = SystemRandomSource().random_bytes(4).hex()
        self.mqtt = MqttConfig(
            host=config.broker_host,
            port=config.broker_port,
            tls=False,
            insecure_plaintext_for_tests=True,
            client_id=f"fedge-sim-ingestor-{self.token}",
            topic_root=f"fedge-sim/{self.token}",
        )
        self.directives = _Directives()
        self.connections: list[Any] = []
        # Sampling and data only (which devices opt out, which labelled images each sees);
        # keys, identities and signatures come from the CSPRNG.
        self.sampler = np.random.default_rng(config.seed)
        self.images: npt.NDArray[np.float32] = np.empty((0, 1, 28, 28), np.float32)
        self.labels: npt.NDArray[np.int64] = np.empty(0, np.int64)

    # --- set-up -----------------------------------------------------------------------

    def fleet(self, data: FashionMNIST, store_key: bytes) -> list[_Device]:
        sampler = self.sampler
        count = self.config.devices
        size = round(self.config.opted_out_fraction * count)
        opted = {int(i) for i in sampler.choice(count, size=size, replace=False)}
        self.images = np.ascontiguousarray((data.test.images.astype(np.float32) / 255.0)[:, None])
        self.labels = data.test.labels.astype(np.int64)
        rng = SystemRandomSource()
        fleet = []
        for number in range(count):
            device_id = f"sim-{number:05d}"
            fleet.append(
                _Device(
                    identity=self.authority.enrol(device_id, rng),
                    guard=DirectiveGuard(
                        None,
                        device_id=device_id,
                        store_public_key=store_key,
                        opted_out=number in opted,
                    ),
                )
            )
        return fleet

    def connect(self, model: str) -> None:
        for number in range(self.config.connections):
            client = mqtt_client(self.mqtt, f"fedge-sim-devices-{self.token}-{number}")
            client.connect(self.mqtt.host, self.mqtt.effective_port)
            client.loop_start()
            self.connections.append(client)
        listener = mqtt_client(self.mqtt, f"fedge-sim-directives-{self.token}")
        listener.on_message = self.directives.on_message
        listener.connect(self.mqtt.host, self.mqtt.effective_port)
        listener.subscribe(directive_topic(model, self.mqtt.topic_root), qos=1)
        listener.loop_start()
        self.connections.append(listener)

    def close(self) -> None:
        for client in self.connections:
            client.disconnect()
            client.loop_stop()

    # --- one round: every device acts on the newest directive and reports -------------

    def round(
        self,
        fleet: list[_Device],
        model: str,
        exposed: set[str],
        bad: int,
        settle: Callable[[], object] = lambda: None,
    ) -> float | None:
        """Return when the first report on version ``bad`` was published (None: no such report)."""
        signed = self.directives.read()
        pending = []
        first_bad: float | None = None
        for index, device in enumerate(fleet):
            if signed is not None and signed.directive.sequence > device.guard.last_sequence(model):
                try:
                    decision = device.guard.decide(signed, model=model, current=device.version)
                except DirectiveRefused as exc:
                    logger.warning("%s refused a directive: %s", device.id, exc)
                else:
                    if decision.action in (Action.INSTALL, Action.ROLLBACK):
                        assert decision.version is not None
                        before, device.version = device.version, decision.version
                        kind = EventKind.MODEL_INSTALLED
                        body: dict[str, Any] = {"model": model, "version": device.version}
                        pending.append(self._event(device, kind, {**body, "from_version": before}))
                    device.guard.acted(model, decision)
            if device.version == bad:
                exposed.add(device.id)
            images, labels = self.feedback(device)
            logits, per_image_ms = self.sessions.infer(device.version, images)
            correct = int((logits.argmax(axis=1) == labels).sum())
            health = {
                "model": model,
                "version": device.version,
                "inferences": len(labels),
                "errors": 0,
                "labelled": len(labels),
                "correct": correct,
                "latency_p95_ms": round(per_image_ms, 4),
                "opted_out": device.guard.opted_out,
            }
            pending.append(self._event(device, EventKind.HEALTH, health))
            if device.version == bad and first_bad is None:
                first_bad = time.monotonic()
            if index % 200 == 199:
                self._flush(pending)
                # Paced: a broker keeps a bounded queue per session (Mosquitto: 1,000 by
                # default) and drops what overflows after acknowledging it to devices.
                settle()
                pending = []
        self._flush(pending)
        return first_bad

    def feedback(self, device: _Device) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Return the labelled images the device saw since its last report (fresh each round)."""
        per = self.config.images_per_device
        start = int(self.sampler.integers(len(self.images) - per))
        return self.images[start : start + per], self.labels[start : start + per]

    def _event(self, device: _Device, kind: EventKind, body: dict[str, Any]) -> tuple[str, bytes]:
        device.seq += 1
        event = sign_event(device.identity, seq=device.seq, kind=kind, body=body, time=time.time())
        return event_topic(device.id, self.mqtt.topic_root), event.to_bytes()

    def _flush(self, messages: list[tuple[str, bytes]]) -> None:
        infos = []
        for number, (topic, payload) in enumerate(messages):
            client = self.connections[number % self.config.connections]
            infos.append(client.publish(topic, payload, qos=1))
        for info in infos:
            info.wait_for_publish(30)
        self.published += len(messages)


def run_rollout_scenario(
    config: RolloutScenario,
    workdir: Path,
    data: FashionMNIST,
    *,
    progress: Callable[[str], None] | None = None,
) -> ScenarioResult:
    """Run both rollouts on a fresh store under ``workdir``; return how each ended."""
    from fl_server.audit import AuditLog
    from fl_server.events.ingest import EventIngestor
    from fl_server.events.mqtt import MqttIngestService
    from fl_server.events.rejections import RejectionRecorder
    from fl_server.events.store import EventStore
    from fl_server.rollout import HealthGates, RolloutController, RolloutPlan, RolloutState
    from fl_server.rollout.service import DirectivePublisher
    from fl_server.store.cli import open_store
    from fl_server.store.release_policy import ReleasePolicy, check_release
    from fl_server.store.run_outcomes import AuditTrailOutcomes

    say = progress or (lambda message: logger.info("%s", message))
    started = time.monotonic()
    say(f"rollout scenario: training the CNN and building its INT8 variants ({workdir})")
    run = _Run(config, workdir, data, say)
    accuracy = run.models.accuracy
    say(
        "  held-out accuracy: FP32 {fp32:.3f}, good INT8 {good_int8:.3f}, "
        "bad INT8 {bad_int8:.3f} (published as {bad_int8_as_published:.3f})".format(**accuracy)
    )
    with open_store(None, None, home=workdir / "home", create=True) as store:
        _publish_versions(store, run.models)
        engine = store.engine
        audit = AuditLog(engine)
        events = EventStore(engine)
        ingestor = EventIngestor(
            events,
            authority_public_key=run.authority.public_key,
            rejections=RejectionRecorder(audit),
            topic_root=run.mqtt.topic_root,
        )
        ingest = MqttIngestService(run.mqtt, ingestor, session_expiry_s=0)
        publisher = DirectivePublisher(run.mqtt, client_id=f"fedge-sim-rollout-{run.token}")
        policy = ReleasePolicy(allow_manual_publish=True, max_accuracy_drop=0.01)
        plan = RolloutPlan(
            stages=config.stages,
            bake_s=config.bake_s,
            gates=HealthGates(min_devices=3, max_accuracy_drop=0.03),
        )
        fleet = run.fleet(data, store.public_key)
        device_ids = [device.id for device in fleet]
        controller = RolloutController(
            store,
            events,
            audit=audit,
            fleet=lambda: device_ids,
            release_check=lambda model, version: check_release(
                store, AuditTrailOutcomes(engine), model, "production", version, policy
            ),
            on_directive=publisher.publish,
        )
        ingest.start()
        publisher.start()
        try:
            if not ingest.wait_subscribed(10) or not publisher.wait_connected(10):
                raise ConfigError(
                    f"no MQTT broker answers on {config.broker_host}:{config.broker_port}"
                )
            run.connect(MODEL)

            def settle() -> None:
                ingest.wait_idle(30)

            outcomes = []
            for version, label in ((2, "good INT8"), (3, "bad INT8")):
                say(f"rolling out {MODEL} v{version} ({label}) to {config.devices} devices")
                exposed: set[str] = set()
                record = controller.start(MODEL, version, plan)
                began = time.monotonic()
                first_bad: float | None = None
                rolled_back_at: float | None = None
                highest = 0
                while record.state in (RolloutState.RUNNING, RolloutState.PAUSED):
                    if time.monotonic() - began > config.timeout_s:
                        raise ConfigError(
                            f"rollout {record.id} did not end in {config.timeout_s} s"
                        )
                    newest = controller.directive(MODEL)
                    assert newest is not None
                    run.directives.wait_for(newest.directive.sequence)
                    seen = run.round(fleet, MODEL, exposed, bad=3, settle=settle)
                    if seen is not None and first_bad is None:
                        first_bad = seen
                    ingest.wait_idle(30)
                    for moved in controller.tick():
                        say(f"  {moved.state.value} at stage {moved.stage + 1}: {moved.reason}")
                        if moved.state is RolloutState.ROLLED_BACK:
                            rolled_back_at = time.monotonic()
                    record = controller.get(record.id)
                    highest = max(highest, record.stage)
                # One more round: every device acts on the final directive (the rollback).
                newest = controller.directive(MODEL)
                assert newest is not None
                run.directives.wait_for(newest.directive.sequence)
                run.round(fleet, MODEL, exposed, bad=3, settle=settle)
                ingest.wait_idle(30)
                versions = sorted({device.version for device in fleet})
                spread = ", ".join(
                    f"{sum(d.version == v for d in fleet)} on v{v}" for v in versions
                )
                say(
                    f"  {record.state.value}: {spread}; {len(exposed)} devices ever ran the "
                    f"bad variant ({100 * len(exposed) / config.devices:.1f} % of the fleet)"
                )
                outcomes.append(
                    RolloutOutcome(
                        rollout_id=record.id,
                        version=version,
                        state=record.state.value,
                        stage_reached=highest + 1,
                        fraction_reached=plan.stages[highest],
                        seconds=time.monotonic() - began,
                        exposed_devices=len(exposed),
                        max_exposed_fraction=len(exposed) / config.devices,
                        seconds_to_rollback=None
                        if first_bad is None or rolled_back_at is None
                        else rolled_back_at - first_bad,
                        reason=record.reason,
                    )
                )
            stats = ingestor.stats()
        finally:
            run.close()
            publisher.close()
            ingest.close(end_session=True)
    return ScenarioResult(
        devices=config.devices,
        opted_out=sum(device.guard.opted_out for device in fleet),
        good=outcomes[0],
        bad=outcomes[1],
        accuracy=accuracy,
        events_published=run.published,
        events_stored=stats.stored,
        events_rejected=stats.rejected_total,
        seconds=time.monotonic() - started,
    )
