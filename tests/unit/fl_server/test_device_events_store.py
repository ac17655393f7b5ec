"""The device_events table: idempotent inserts and the reads the rollout controller uses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from edge_runtime.device_events import DeviceEvent, EventKind, sign_event
from fedge.errors import ConfigError
from fl_server.events import MAX_READ, EventStore, InsertOutcome
from secure_agg.identity import EnrolmentAuthority, NodeIdentity
from secure_agg.randomness import DeterministicRandom

AUTHORITY = EnrolmentAuthority.generate(DeterministicRandom(1))
DEVICES = [AUTHORITY.enrol(f"dev-{n:016x}", DeterministicRandom(10 + n)) for n in range(3)]
T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def _event(
    identity: NodeIdentity,
    seq: int,
    kind: EventKind = EventKind.HEALTH,
    body: dict[str, Any] | None = None,
) -> DeviceEvent:
    return sign_event(identity, seq=seq, kind=kind, body=body or {"seq": seq}, time=1e9 + seq)


@pytest.fixture
def store(engine: Engine) -> EventStore:
    return EventStore(engine)


def test_an_event_is_stored_once_and_its_duplicates_are_recognised(store: EventStore) -> None:
    event = _event(DEVICES[0], 1)

    assert store.insert([event], received_at=T0) == [InsertOutcome.STORED]
    assert store.insert([event, event], received_at=T0) == [InsertOutcome.DUPLICATE] * 2

    assert store.count() == 1
    (stored,) = store.events()
    assert (stored.device, stored.seq, stored.kind) == (
        DEVICES[0].certificate.enrolment_id,
        1,
        EventKind.HEALTH,
    )
    assert stored.body == {"seq": 1}
    assert stored.event_time == 1e9 + 1
    assert stored.received_at == T0


def test_duplicates_within_one_batch_are_stored_once(store: EventStore) -> None:
    event = _event(DEVICES[0], 1)

    outcomes = store.insert([event, _event(DEVICES[0], 2), event], received_at=T0)

    assert outcomes == [InsertOutcome.STORED, InsertOutcome.STORED, InsertOutcome.DUPLICATE]
    assert store.count() == 2


def test_another_event_under_a_taken_sequence_number_is_a_conflict(store: EventStore) -> None:
    original = _event(DEVICES[0], 5)
    other = _event(DEVICES[0], 5, body={"different": True})
    store.insert([original], received_at=T0)

    assert store.insert([other], received_at=T0) == [InsertOutcome.CONFLICT]
    assert store.insert(
        [_event(DEVICES[1], 9), other, _event(DEVICES[1], 9, body={"x": 1})], received_at=T0
    ) == [
        InsertOutcome.STORED,
        InsertOutcome.CONFLICT,
        InsertOutcome.CONFLICT,
    ]
    assert [
        event.body for event in store.events(devices=[DEVICES[0].certificate.enrolment_id])
    ] == [{"seq": 5}]


def test_out_of_order_events_are_each_stored_once(store: EventStore) -> None:
    device = DEVICES[0]
    for seq in (3, 1, 2, 3, 1):
        store.insert([_event(device, seq)], received_at=T0)

    assert sorted(event.seq for event in store.events()) == [1, 2, 3]
    assert store.latest_seq(device.certificate.enrolment_id) == 3
    assert store.latest_seq("dev-unknown") is None


def test_a_large_batch_is_stored_in_one_call(store: EventStore) -> None:
    events = [_event(DEVICES[n % 3], 1 + n // 3) for n in range(1_200)]

    outcomes = store.insert(events + events[:10], received_at=T0)

    assert outcomes.count(InsertOutcome.STORED) == 1_200
    assert outcomes.count(InsertOutcome.DUPLICATE) == 10
    assert store.count() == 1_200


def test_events_filter_by_kind_device_cursor_and_time(store: EventStore) -> None:
    a, b = (identity.certificate.enrolment_id for identity in DEVICES[:2])
    store.insert([_event(DEVICES[0], 1), _event(DEVICES[1], 1, EventKind.DRIFT)], received_at=T0)
    later = T0 + timedelta(minutes=5)
    store.insert([_event(DEVICES[0], 2, EventKind.CRASH), _event(DEVICES[1], 2)], received_at=later)
    everything = store.events()

    assert [(e.device, e.seq) for e in everything] == [(a, 1), (b, 1), (a, 2), (b, 2)]
    assert [e.seq for e in store.events(kinds=[EventKind.CRASH, EventKind.DRIFT])] == [1, 2]
    assert [e.device for e in store.events(devices=[b])] == [b, b]
    assert store.events(since_id=everything[1].id) == everything[2:]
    assert store.events(received_after=later) == everything[2:]
    assert store.events(limit=1) == everything[:1]
    assert store.count(kinds=[EventKind.HEALTH]) == 2


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"limit": 0}, "limit must be"),
        ({"limit": MAX_READ + 1}, "limit must be"),
        ({"since_id": -1}, "since_id must be"),
        ({"kinds": ["health"]}, "kinds must be EventKind"),
        ({"received_after": datetime(2026, 1, 1)}, "timezone-aware"),
    ],
)
def test_events_refuses_bad_arguments(
    store: EventStore, arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        store.events(**arguments)


def test_devices_reporting_counts_distinct_devices_in_the_window(store: EventStore) -> None:
    store.insert(
        [
            _event(DEVICES[0], 1, EventKind.DRIFT, {"drifted": True}),
            _event(DEVICES[0], 2, EventKind.DRIFT, {"drifted": True}),
            _event(DEVICES[1], 1, EventKind.DRIFT, {"drifted": False}),
        ],
        received_at=T0,
    )
    store.insert(
        [_event(DEVICES[2], 1, EventKind.DRIFT, {"drifted": True})],
        received_at=T0 + timedelta(hours=2),
    )
    window_start = T0 + timedelta(minutes=-1)

    every = store.devices_reporting(EventKind.DRIFT, received_after=window_start)
    drifting = store.devices_reporting(
        EventKind.DRIFT, received_after=window_start, where=lambda body: body["drifted"] is True
    )
    recent = store.devices_reporting(EventKind.DRIFT, received_after=T0 + timedelta(hours=1))

    names = [identity.certificate.enrolment_id for identity in DEVICES]
    assert every == set(names)
    assert drifting == {names[0], names[2]}
    assert recent == {names[2]}


def test_insert_needs_an_aware_time(store: EventStore) -> None:
    with pytest.raises(ConfigError, match="timezone-aware"):
        store.insert([_event(DEVICES[0], 1)], received_at=datetime(2026, 1, 1))
