"""The rollout controller: every transition, gates that pass and fail, rollback, restarts.

Device reports are real signed events (as the MQTT ingestor stores them); the
clock is injected so bake times pass instantly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import count
from pathlib import Path

import pytest
from sqlalchemy import Engine

from edge_runtime.device_events import EventKind, sign_event
from edge_runtime.release import DirectiveKind, verify_directive
from fedge.errors import ConfigError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.events.store import EventStore
from fl_server.rollout import (
    HealthGates,
    RolloutController,
    RolloutPlan,
    RolloutState,
    Verdict,
)
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.store import ModelStore, NewArtefact, VersionInfo
from secure_agg.identity import EnrolmentAuthority, NodeIdentity
from secure_agg.randomness import DeterministicRandom

FLEET = [f"dev-{i:04d}" for i in range(400)]
PLAN = RolloutPlan(
    stages=(0.05, 0.5, 1.0), bake_s=60.0, gates=HealthGates(min_devices=3, min_report_fraction=0.5)
)


@dataclass
class Clock:
    now: float = field(default_factory=lambda: datetime.now(UTC).timestamp())

    def __call__(self) -> float:
        return self.now


@dataclass
class Fleet:
    """Signed reports from the fleet's devices, stored as the ingestor stores them."""

    events: EventStore
    clock: Clock
    authority: EnrolmentAuthority = field(
        default_factory=lambda: EnrolmentAuthority.generate(DeterministicRandom(7))
    )
    identities: dict[str, NodeIdentity] = field(default_factory=dict)
    seqs: dict[str, Iterator[int]] = field(default_factory=dict)

    def send(self, device: str, kind: EventKind, body: dict[str, object]) -> None:
        if device not in self.identities:
            rng = DeterministicRandom(hash(device) & 0xFFFF)
            self.identities[device] = self.authority.enrol(device, rng)
            self.seqs[device] = count(1)
        event = sign_event(
            self.identities[device],
            seq=next(self.seqs[device]),
            kind=kind,
            body=body,
            time=self.clock.now,
        )
        self.events.insert([event], received_at=datetime.fromtimestamp(self.clock.now, UTC))

    def health(
        self,
        device: str,
        version: int,
        *,
        accuracy: float = 0.9,
        errors: int = 0,
        opted_out: bool = False,
    ) -> None:
        self.send(
            device,
            EventKind.HEALTH,
            {
                "model": "cnn",
                "version": version,
                "inferences": 100,
                "errors": errors,
                "labelled": 100,
                "correct": round(100 * accuracy),
                "latency_p95_ms": 1.5,
                "opted_out": opted_out,
            },
        )


@dataclass
class Env:
    controller: RolloutController
    fleet: Fleet
    store: ModelStore
    clock: Clock
    key: StoreKey
    engine: Engine

    def __iter__(self) -> Iterator[object]:
        return iter((self.controller, self.fleet, self.store, self.clock))


@pytest.fixture
def env(engine: Engine, tmp_path: Path) -> Env:
    key = StoreKey.generate()
    audit = AuditLog(engine)
    store = ModelStore(engine, FileBlobStore(tmp_path / "blobs"), key, audit=audit)
    for tag in (b"1", b"2", b"3"):
        store.publish(
            "cnn",
            [NewArtefact(name="weights.npz", data=b"w" + tag)],
            info=VersionInfo(metrics={"accuracy": 0.9}),
        )
    store.tag("cnn", "production", 1)
    clock = Clock()
    events = EventStore(engine)
    controller = RolloutController(store, events, audit=audit, clock=clock, fleet=lambda: FLEET)
    return Env(controller, Fleet(events, clock), store, clock, key, engine)


def cohort(controller: RolloutController) -> list[str]:
    """The devices the newest directive addresses (its bound admits an exact share)."""
    signed = controller.directive("cnn")
    assert signed is not None
    return [d for d in FLEET if signed.directive.targets(d)]


def test_start_issues_a_signed_directive_for_the_first_stage(env: Env) -> None:
    controller, store = env.controller, env.store
    record = controller.start("cnn", 2, PLAN)

    assert (record.state, record.stage, record.previous) == (RolloutState.RUNNING, 0, 1)
    signed = controller.directive("cnn")
    assert signed is not None
    directive = verify_directive(signed, store.public_key)
    assert (directive.kind, directive.version) == (DirectiveKind.ROLLOUT, 2)
    # The bound admits exactly 5 % of the known fleet, never a binomial draw around it.
    assert sum(directive.targets(device) for device in FLEET) == 20
    assert directive.rollout_id == record.id and directive.previous == 1
    with pytest.raises(ConfigError, match="still active"):
        controller.start("cnn", 3, PLAN)


def test_start_refuses_what_cannot_be_rolled_out(env: Env) -> None:
    controller, store = env.controller, env.store
    with pytest.raises(ConfigError, match="not newer than production v1"):
        controller.start("cnn", 1, PLAN)
    with pytest.raises(ConfigError, match="no version 9"):
        controller.start("cnn", 9, PLAN)
    store.publish("other", [NewArtefact(name="weights.npz", data=b"o")])
    with pytest.raises(ConfigError, match="no alias 'production'"):
        controller.start("other", 1, PLAN)
    refusing = RolloutController(
        store,
        EventStore(env.engine),
        release_check=lambda model, version: ["its run did not complete"],
    )
    with pytest.raises(ConfigError, match="release policy refuses cnn v2: its run did not"):
        refusing.start("cnn", 2, PLAN)


def test_a_healthy_canary_waits_for_its_bake_then_promotes_to_completion(env: Env) -> None:
    controller, fleet, store, clock = env.controller, env.fleet, env.store, env.clock
    record = controller.start("cnn", 2, PLAN)
    members = set(cohort(controller))
    for device in FLEET:
        fleet.health(device, 2 if device in members else 1)

    assert controller.status(record.id).verdict is Verdict.PASS
    assert controller.tick() == []  # the bake time has not passed
    clock.now += 61
    (moved,) = controller.tick()
    assert (moved.state, moved.stage) == (RolloutState.RUNNING, 1)
    assert len(cohort(controller)) == 200

    # The next stage judges only what was reported since it began.
    assert controller.status(record.id).verdict is Verdict.WAIT
    members = set(cohort(controller))
    for device in FLEET:
        fleet.health(device, 2 if device in members else 1)
    clock.now += 61
    assert controller.tick()[0].stage == 2
    for device in FLEET:
        fleet.health(device, 2)
    clock.now += 61
    (done,) = controller.tick()

    assert done.state is RolloutState.COMPLETED
    assert store.aliases("cnn")["production"] == 2
    assert controller.tick() == []


def test_missing_data_means_wait_never_promote(env: Env) -> None:
    controller, fleet, clock = env.controller, env.fleet, env.clock
    record = controller.start("cnn", 2, PLAN)
    canary = cohort(controller)
    assert len(canary) >= 6
    for device in canary[: len(canary) // 2 - 1]:  # under half the cohort reported
        fleet.health(device, 2)
    clock.now += 3600

    status = controller.status(record.id)
    assert status.verdict is Verdict.WAIT
    assert controller.tick() == []
    assert controller.get(record.id).stage == 0


def test_a_bad_canary_is_rolled_back_automatically(env: Env) -> None:
    controller, fleet, store = env.controller, env.fleet, env.store
    controller.start("cnn", 2, PLAN)
    members = set(cohort(controller))
    for device in FLEET:
        on_new = device in members
        fleet.health(device, 2 if on_new else 1, accuracy=0.3 if on_new else 0.9)

    (moved,) = controller.tick()  # no bake wait: failing gates roll back at once

    assert moved.state is RolloutState.ROLLED_BACK
    assert "accuracy" in (moved.reason or "")
    signed = controller.directive("cnn")
    assert signed is not None
    directive = verify_directive(signed, store.public_key)
    assert (directive.kind, directive.version, directive.cohort_fraction) == (
        DirectiveKind.ROLLBACK,
        1,
        1.0,
    )
    assert store.aliases("cnn")["production"] == 1
    kinds = [e.kind for e in AuditLog(env.engine).iter()]
    assert kinds.count(AuditEventKind.ROLLOUT_TRANSITION) == 1


def test_one_device_can_neither_abort_nor_promote_alone(env: Env) -> None:
    controller, fleet, clock = env.controller, env.fleet, env.clock
    record = controller.start("cnn", 2, PLAN)
    canary = cohort(controller)
    hostile, honest = canary[0], canary[1:]
    fleet.health(hostile, 2, accuracy=0.0, errors=100)
    fleet.send(hostile, EventKind.CRASH, {"model": "cnn", "version": 2})
    rolled_back = {"model": "cnn", "from_version": 2, "to_version": 1}
    fleet.send(hostile, EventKind.MODEL_ROLLED_BACK, rolled_back)
    for device in FLEET:
        if device not in canary:
            fleet.health(device, 1)
    clock.now += 3600
    assert controller.tick() == []  # one bad device does not abort (and alone cannot promote)
    assert controller.status(record.id).verdict is Verdict.WAIT

    for device in honest:
        fleet.health(device, 2)
    assert controller.status(record.id).verdict is Verdict.PASS
    assert controller.tick()[0].stage == 1


def test_fraction_gates_fail_with_enough_devices(env: Env) -> None:
    controller, fleet = env.controller, env.fleet
    record = controller.start("cnn", 2, PLAN)
    canary = cohort(controller)
    for device in canary:
        fleet.health(device, 2)
    for device in canary[:2]:
        fleet.send(device, EventKind.CRASH, {"model": "cnn", "version": 2})

    status = controller.status(record.id)

    assert status.verdict is Verdict.FAIL
    assert [g.name for g in status.gates if g.verdict is Verdict.FAIL] == ["crashes"]


def test_malformed_bodies_are_counted_and_ignored(env: Env) -> None:
    controller, fleet = env.controller, env.fleet
    record = controller.start("cnn", 2, PLAN)
    device = cohort(controller)[0]
    fleet.send(device, EventKind.HEALTH, {"model": "cnn", "version": 2, "inferences": -1})
    fleet.send(
        device,
        EventKind.HEALTH,
        {"model": "cnn", "version": 2, "inferences": 1, "errors": 5, "labelled": 0, "correct": 0},
    )

    status = controller.status(record.id)

    assert status.malformed_events == 2
    assert status.target_devices == 0


def test_a_restarted_controller_resumes_with_its_bake_timer(env: Env) -> None:
    controller, fleet, store, clock = env.controller, env.fleet, env.store, env.clock
    record = controller.start("cnn", 2, PLAN)
    members = set(cohort(controller))
    for device in FLEET:
        fleet.health(device, 2 if device in members else 1)
    clock.now += 30

    restarted = RolloutController(
        store,
        EventStore(env.engine),
        audit=AuditLog(env.engine),
        clock=clock,
        fleet=lambda: FLEET,
    )
    assert restarted.status(record.id).bake_left_s == pytest.approx(30.0)
    assert restarted.tick() == []
    clock.now += 31
    assert restarted.tick()[0].stage == 1


def test_pause_resume_promote_and_rollback_by_hand(env: Env) -> None:
    controller, fleet, store, clock = env.controller, env.fleet, env.store, env.clock
    record = controller.start("cnn", 2, PLAN)
    members = set(cohort(controller))
    for device in FLEET:
        fleet.health(device, 2 if device in members else 1)

    assert controller.pause(record.id).state is RolloutState.PAUSED
    clock.now += 3600
    assert controller.tick() == []  # a paused rollout never moves by itself
    with pytest.raises(ConfigError, match="cannot pause a paused rollout"):
        controller.pause(record.id)
    assert controller.resume(record.id).state is RolloutState.RUNNING
    assert controller.promote(record.id).stage == 1
    assert controller.promote(record.id).stage == 2
    assert controller.promote(record.id).state is RolloutState.COMPLETED
    assert store.aliases("cnn")["production"] == 2
    with pytest.raises(ConfigError, match="cannot resume a completed rollout"):
        controller.resume(record.id)

    # A completed rollout rolled back: production and the whole fleet go back, signed.
    rolled = controller.rollback(record.id, "regression found in the field")
    assert rolled.state is RolloutState.ROLLED_BACK
    assert store.aliases("cnn")["production"] == 1
    signed = controller.directive("cnn")
    assert signed is not None and signed.directive.kind is DirectiveKind.ROLLBACK
    with pytest.raises(ConfigError, match="cannot rollback a rolled_back rollout"):
        controller.rollback(record.id)
    transitions = [
        e.payload["transition"]
        for e in AuditLog(env.engine).iter()
        if e.kind is AuditEventKind.ROLLOUT_TRANSITION
    ]
    assert transitions == ["pause", "resume", "advance", "advance", "advance", "rollback"]


def test_promote_refuses_a_failing_rollout_unless_forced(env: Env) -> None:
    controller, fleet = env.controller, env.fleet
    record = controller.start("cnn", 2, PLAN)
    controller.pause(record.id)
    for device in cohort(controller):
        fleet.health(device, 2, errors=50)

    with pytest.raises(ConfigError, match="fails its gates \\(error rate\\)"):
        controller.promote(record.id)
    assert controller.promote(record.id, force=True).stage == 1


def test_directive_sequences_only_grow(env: Env) -> None:
    controller = env.controller
    record = controller.start("cnn", 2, PLAN)
    first = controller.directive("cnn")
    controller.promote(record.id, force=True)
    second = controller.directive("cnn")
    controller.rollback(record.id)
    third = controller.directive("cnn")
    assert first and second and third
    assert [s.directive.sequence for s in (first, second, third)] == [1, 2, 3]
    record2 = controller.start("cnn", 3, PLAN)
    fourth = controller.directive("cnn")
    assert fourth is not None and fourth.directive.sequence == 4
    assert fourth.directive.rollout_id == record2.id


def test_one_device_claiming_a_million_labels_moves_nothing(env: Env) -> None:
    controller, fleet = env.controller, env.fleet
    record = controller.start("cnn", 2, PLAN)
    canary = cohort(controller)
    for device in FLEET:
        if device not in canary:
            fleet.health(device, 1)
    for device in canary[1:]:
        fleet.health(device, 2)
    huge = {"model": "cnn", "version": 2, "inferences": 10**6, "errors": 0}
    fleet.send(canary[0], EventKind.HEALTH, {**huge, "labelled": 10**6, "correct": 0})

    status = controller.status(record.id)

    accuracy = next(g for g in status.gates if g.name == "accuracy")
    assert accuracy.verdict is Verdict.PASS  # its claim is capped, then set aside
    assert accuracy.value == pytest.approx(0.9)


def test_a_small_but_consistent_drop_fails_only_when_significant(env: Env) -> None:
    controller, fleet = env.controller, env.fleet
    record = controller.start("cnn", 2, PLAN)
    canary = cohort(controller)
    for device in FLEET:
        if device not in canary:
            fleet.health(device, 1, accuracy=0.9)
    for device in canary[:4]:  # few samples, 4 points down: not significant yet
        fleet.health(device, 2, accuracy=0.86)
    first = next(g for g in controller.status(record.id).gates if g.name == "accuracy")
    assert first.verdict is Verdict.WAIT
    for _ in range(10):  # the same drop on many more samples: significant
        for device in canary:
            fleet.health(device, 2, accuracy=0.86)
    later = next(g for g in controller.status(record.id).gates if g.name == "accuracy")
    assert later.verdict is Verdict.FAIL


def test_a_fleet_without_labelled_feedback_is_judged_on_errors(env: Env) -> None:
    controller, fleet, clock = env.controller, env.fleet, env.clock
    record = controller.start("cnn", 2, PLAN)
    members = set(cohort(controller))
    unlabelled = {"model": "cnn", "inferences": 100, "labelled": 0, "correct": 0}
    for device in FLEET:
        version = 2 if device in members else 1
        fleet.send(device, EventKind.HEALTH, {**unlabelled, "version": version, "errors": 0})
    clock.now += 61

    assert controller.tick()[0].stage == 1  # no labels: the accuracy gate does not freeze it
    members = set(cohort(controller))
    for device in members:
        fleet.send(device, EventKind.HEALTH, {**unlabelled, "version": 2, "errors": 30})
    (moved,) = controller.tick()
    assert moved.state is RolloutState.ROLLED_BACK and "error rate" in (moved.reason or "")
    assert record.id == moved.id


def test_each_device_class_gets_its_fastest_variant_above_the_floor(env: Env) -> None:
    from edge_runtime.device_profile import DeviceProfile
    from edge_runtime.manifest import ArtefactFormat, Precision
    from edge_runtime.release import verify_directive

    controller, fleet, store = env.controller, env.fleet, env.store
    quality = {"model-fp32.onnx": 0.90, "model-int8-static.onnx": 0.89, "model-int4.onnx": 0.70}
    store.publish(
        "cnn",
        [
            NewArtefact(
                name=name,
                data=name.encode(),
                format=ArtefactFormat.ONNX,
                precision=Precision.INT8 if "int" in name else Precision.FP32,
                quality={"accuracy": accuracy},
            )
            for name, accuracy in quality.items()
        ],
        info=VersionInfo(metrics={"accuracy": 0.9}),
    )
    for number, device in enumerate(FLEET[:12]):
        vnni = number % 2 == 0
        profile = DeviceProfile(
            providers=("CPUExecutionProvider",),
            memory_mb=2048,
            cpu_features=("avx2", "avx512_vnni", "avx512f") if vnni else ("avx2",),
            latency_ms={
                "model-fp32.onnx": 0.10,
                "model-int8-static.onnx": 0.06 if vnni else 0.14,
                "model-int4.onnx": 0.01,  # fastest everywhere, but below the floor
            },
        )
        fleet.send(device, EventKind.DEVICE_PROFILE, profile.to_json())

    record = controller.start("cnn", 4, RolloutPlan(stages=(0.5, 1.0), accuracy_floor=0.85))

    assert dict(record.plan.variants) == {
        "cpu-vnni": "model-int8-static.onnx",
        "cpu-avx2": "model-fp32.onnx",
    }
    signed = controller.directive("cnn")
    assert signed is not None
    assert dict(verify_directive(signed, store.public_key).variants) == dict(record.plan.variants)
