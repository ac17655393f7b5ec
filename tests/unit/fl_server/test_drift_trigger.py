"""The drift trigger: enough distinct drifting devices in a window ask for retraining once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from edge_runtime.device_events import EventKind, sign_event
from fedge.errors import ConfigError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.events import DriftPolicy, DriftTrigger, EventStore, RetrainingRequest
from secure_agg.identity import EnrolmentAuthority
from secure_agg.randomness import DeterministicRandom

AUTHORITY = EnrolmentAuthority.generate(DeterministicRandom(1))
FLEET = [AUTHORITY.enrol(f"dev-{n:016x}", DeterministicRandom(100 + n)) for n in range(10)]
T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
POLICY = DriftPolicy(threshold=0.3, window=timedelta(hours=1), min_devices=2, name="cnn")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(engine: Engine) -> EventStore:
    return EventStore(engine)


@pytest.fixture
def audit(engine: Engine, clock: Clock) -> AuditLog:
    return AuditLog(engine, clock=clock)


def _report(store: EventStore, device: int, seq: int, at: datetime, drifted: bool = True) -> Any:
    event = sign_event(
        FLEET[device],
        seq=seq,
        kind=EventKind.DRIFT,
        body={"kind": "drift.report", "drifted": drifted, "psi_max": 0.4},
        time=1.7e9,
    )
    store.insert([event], received_at=at)
    return event


def _trigger(
    store: EventStore, audit: AuditLog, clock: Clock, requests: list[RetrainingRequest]
) -> DriftTrigger:
    return DriftTrigger(
        store,
        audit,
        policy=POLICY,
        population=lambda: len(FLEET),
        on_request=requests.append,
        clock=clock,
    )


def _requested(audit: AuditLog) -> list[dict[str, Any]]:
    return [
        dict(event.payload)
        for event in audit.iter()
        if event.kind is AuditEventKind.RETRAINING_REQUESTED
    ]


def test_drift_on_enough_distinct_devices_requests_retraining_once_per_window(
    store: EventStore, audit: AuditLog, clock: Clock
) -> None:
    requests: list[RetrainingRequest] = []
    trigger = _trigger(store, audit, clock, requests)
    for seq in range(1, 6):  # one device reporting five times is one device
        _report(store, 0, seq, T0)
    _report(store, 1, 1, T0)
    assert trigger.check() is None  # 2 of 10 < 0.3

    clock.now = T0 + timedelta(minutes=10)
    event = _report(store, 2, 1, clock.now)
    request = trigger.observe([event])

    assert request is not None
    assert (request.devices_reporting, request.population) == (3, 10)
    assert request.fraction == pytest.approx(0.3)
    assert requests == [request]
    (payload,) = _requested(audit)
    assert payload["trigger"] == "cnn"
    assert payload["devices_reporting"] == 3
    assert payload["devices"] == sorted(f"dev-{n:016x}" for n in range(3))

    clock.now = T0 + timedelta(minutes=50)
    _report(store, 3, 1, clock.now)
    assert trigger.check() is None  # within the window of the last request
    clock.now = T0 + timedelta(minutes=71)
    _report(store, 4, 1, clock.now)
    _report(store, 5, 1, clock.now)
    second = trigger.check()
    assert second is not None
    assert second.devices_reporting == 3  # devices 3..5: the earlier reports fell out
    assert len(_requested(audit)) == 2


def test_reports_without_drift_and_too_few_devices_do_not_trigger(
    store: EventStore, audit: AuditLog, clock: Clock
) -> None:
    requests: list[RetrainingRequest] = []
    trigger = DriftTrigger(
        store, audit, policy=POLICY, population=lambda: 2, on_request=requests.append, clock=clock
    )
    quiet = [_report(store, n, 1, T0, drifted=False) for n in range(5)]
    alone = _report(store, 6, 1, T0)

    assert trigger.observe(quiet) is None
    assert trigger.observe([alone]) is None  # 1 of 2 is half, but below min_devices
    assert requests == []
    empty = DriftTrigger(store, audit, policy=POLICY, population=lambda: 0, clock=clock)
    _report(store, 7, 1, T0)
    assert empty.check() is None


def test_a_restarted_trigger_remembers_its_last_request(
    store: EventStore, audit: AuditLog, clock: Clock
) -> None:
    for n in range(4):
        _report(store, n, 1, T0)
    assert _trigger(store, audit, clock, []).check() is not None

    clock.now = T0 + timedelta(minutes=30)
    restarted = _trigger(store, audit, clock, [])
    other = DriftTrigger(
        store,
        audit,
        policy=DriftPolicy(threshold=0.3, name="other-model"),
        population=lambda: len(FLEET),
        clock=clock,
    )

    assert restarted.check() is None
    assert other.check() is not None  # another trigger's request does not silence it


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": 0.5, "window": timedelta(0)}, "window"),
        ({"threshold": 0.5, "min_devices": 0}, "min_devices"),
        ({"threshold": 0.5, "name": "a b"}, "name"),
    ],
)
def test_the_policy_is_checked(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DriftPolicy(**fields)
