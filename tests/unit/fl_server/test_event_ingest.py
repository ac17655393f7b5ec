"""The ingestor: forged, misdirected, replayed, duplicated and out-of-order events; the audit."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine

from edge_runtime._json import canonical_bytes
from edge_runtime.device_events import DeviceEvent, EventKind, sign_event
from edge_runtime.mqtt_config import event_topic
from fedge.errors import ConfigError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.enrolment import DeviceRegistry, create_tokens
from fl_server.events import (
    DeviceStanding,
    EventIngestor,
    EventStore,
    IngestOutcome,
    RejectionLimits,
    RejectionRecorder,
    RejectReason,
    registry_standing,
)
from fl_server.pki import public_key_to_pem
from secure_agg.crypto import signing_key_from_seed
from secure_agg.identity import EnrolmentAuthority, NodeIdentity
from secure_agg.randomness import DeterministicRandom

AUTHORITY = EnrolmentAuthority.generate(DeterministicRandom(1))
NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
EXPIRES = int((NOW + timedelta(days=30)).timestamp())
A = AUTHORITY.enrol("dev-000000000000000a", DeterministicRandom(2), expires_at=EXPIRES)
B = AUTHORITY.enrol("dev-000000000000000b", DeterministicRandom(3), expires_at=EXPIRES)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def _event(identity: NodeIdentity, seq: int, body: dict[str, Any] | None = None) -> DeviceEvent:
    return sign_event(
        identity, seq=seq, kind=EventKind.HEALTH, body=body or {"ok": True}, time=1.7e9
    )


def _message(event: DeviceEvent, device: str | None = None) -> tuple[str, bytes]:
    return event_topic(device or event.device), event.to_bytes()


def _id(identity: NodeIdentity) -> str:
    return identity.certificate.enrolment_id


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def audit(engine: Engine, clock: Clock) -> AuditLog:
    return AuditLog(engine, clock=clock)


@pytest.fixture
def ingestor(engine: Engine, audit: AuditLog, clock: Clock) -> EventIngestor:
    return EventIngestor(
        EventStore(engine),
        authority_public_key=AUTHORITY.public_key,
        rejections=RejectionRecorder(audit, clock=clock),
        clock=clock,
    )


def _rejections(audit: AuditLog) -> list[dict[str, Any]]:
    return [
        dict(event.payload)
        for event in audit.iter()
        if event.kind is AuditEventKind.DEVICE_EVENTS_REJECTED
    ]


def test_a_valid_event_is_stored_and_counted(ingestor: EventIngestor, audit: AuditLog) -> None:
    result = ingestor.ingest(*_message(_event(A, 1)))

    assert result.outcome is IngestOutcome.STORED
    assert (result.device, result.seq) == (_id(A), 1)
    assert ingestor.store.latest_seq(_id(A)) == 1
    (stored,) = ingestor.store.events()
    assert stored.received_at == NOW
    assert ingestor.stats().stored == 1
    assert _rejections(audit) == []


def test_duplicates_and_replays_are_dropped_counted_and_not_audited(
    ingestor: EventIngestor, audit: AuditLog
) -> None:
    first, second = _event(A, 1), _event(A, 2)
    ingestor.ingest_many([_message(first), _message(second)])

    duplicate = ingestor.ingest(*_message(second))  # QoS 1 redelivery
    replayed = ingestor.ingest(*_message(first))  # a captured event sent again later

    assert duplicate.outcome is IngestOutcome.DUPLICATE
    assert replayed.outcome is IngestOutcome.DUPLICATE
    assert ingestor.store.count() == 2
    stats = ingestor.stats()
    assert (stats.received, stats.stored, stats.duplicates, stats.rejected_total) == (4, 2, 2, 0)
    assert _rejections(audit) == []


def test_out_of_order_events_are_accepted_once(ingestor: EventIngestor) -> None:
    events = {seq: _event(A, seq) for seq in (1, 2, 3)}

    results = ingestor.ingest_many([_message(events[s]) for s in (3, 1, 3, 2, 1)])

    assert [r.outcome for r in results] == [
        IngestOutcome.STORED,
        IngestOutcome.STORED,
        IngestOutcome.DUPLICATE,
        IngestOutcome.STORED,
        IngestOutcome.DUPLICATE,
    ]
    assert sorted(event.seq for event in ingestor.store.events()) == [1, 2, 3]


def _forged_signature() -> tuple[str, bytes]:
    document = json.loads(_event(A, 1).to_bytes())
    document["body"] = {"ok": False}  # signed {"ok": true}
    return event_topic(_id(A)), canonical_bytes(document)


def _another_devices_certificate() -> tuple[str, bytes]:
    # A signs with its own key, naming B and presenting B's certificate.
    document = json.loads(_event(A, 1).to_bytes())
    document["device"] = _id(B)
    document["certificate"] = B.certificate.to_json()
    return event_topic(_id(B)), canonical_bytes(document)


def _naming_another_device() -> tuple[str, bytes]:
    # A's own certificate, but the event claims to be B's.
    document = json.loads(_event(A, 1).to_bytes())
    document["device"] = _id(B)
    return event_topic(_id(B)), canonical_bytes(document)


def _other_authority() -> tuple[str, bytes]:
    rogue = EnrolmentAuthority.generate(DeterministicRandom(99)).enrol(
        _id(A), DeterministicRandom(2), expires_at=EXPIRES
    )
    return _message(_event(rogue, 1))


def _expired() -> tuple[str, bytes]:
    lapsed = AUTHORITY.enrol(_id(A), DeterministicRandom(2), expires_at=int(NOW.timestamp()))
    return _message(_event(lapsed, 1))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: (event_topic("dev-000000000000000a"), b"{not json"), RejectReason.MALFORMED),
        (lambda: ("other/topic", _event(A, 1).to_bytes()), RejectReason.TOPIC_MISMATCH),
        (lambda: _message(_event(A, 1), _id(B)), RejectReason.TOPIC_MISMATCH),
        (_forged_signature, RejectReason.BAD_SIGNATURE),
        (_another_devices_certificate, RejectReason.BAD_SIGNATURE),
        (_naming_another_device, RejectReason.IDENTITY_MISMATCH),
        (_other_authority, RejectReason.BAD_SIGNATURE),
        (_expired, RejectReason.BAD_SIGNATURE),
    ],
)
def test_a_rejected_event_is_never_stored_and_is_audited_with_its_reason(
    ingestor: EventIngestor, audit: AuditLog, make: Any, reason: RejectReason
) -> None:
    topic, payload = make()

    result = ingestor.ingest(topic, payload)

    assert result.outcome is IngestOutcome.REJECTED
    assert result.reason is reason
    assert ingestor.store.count() == 0
    assert ingestor.stats().rejected == {reason.value: 1}
    (record,) = _rejections(audit)
    assert record["reason"] == reason.value
    assert record["summary"] is False
    assert payload.decode("latin-1") not in json.dumps(record)


def test_a_different_event_under_a_stored_sequence_number_is_a_rejected_conflict(
    ingestor: EventIngestor, audit: AuditLog
) -> None:
    ingestor.ingest(*_message(_event(A, 4)))

    result = ingestor.ingest(*_message(_event(A, 4, {"ok": False})))

    assert (result.outcome, result.reason) == (IngestOutcome.REJECTED, RejectReason.SEQ_CONFLICT)
    assert [event.body for event in ingestor.store.events()] == [{"ok": True}]
    (record,) = _rejections(audit)
    assert (record["reason"], record["device"], record["seq"]) == ("seq_conflict", _id(A), 4)


def test_one_device_cannot_forge_another_devices_events(ingestor: EventIngestor) -> None:
    attempts = [_another_devices_certificate(), _naming_another_device()]
    attempts.append(_message(_event(A, 1), _id(B)))

    results = ingestor.ingest_many(attempts)

    assert all(result.outcome is IngestOutcome.REJECTED for result in results)
    assert ingestor.store.latest_seq(_id(B)) is None
    assert ingestor.store.latest_seq(_id(A)) is None


def test_a_flood_of_rejections_writes_a_bounded_number_of_records(
    engine: Engine, audit: AuditLog, clock: Clock
) -> None:
    ingestor = EventIngestor(
        EventStore(engine),
        authority_public_key=AUTHORITY.public_key,
        rejections=RejectionRecorder(
            audit, limits=RejectionLimits(events_per_window=2, max_devices=2), clock=clock
        ),
        clock=clock,
    )
    junk = [(event_topic(f"dev-{n:016x}"), b"junk") for n in range(50)]
    junk.append(("not/an/event/topic", b"junk"))

    ingestor.ingest_many(junk)
    assert len(_rejections(audit)) == 2
    clock.now += timedelta(minutes=1)
    ingestor.rejections.flush()

    records = _rejections(audit)
    assert len(records) == 3
    summary = records[2]
    assert summary["summary"] is True
    assert summary["suppressed"] == 49
    assert summary["reasons"] == {"malformed": 49}
    assert sum(summary["topic_devices"].values()) + summary["other_devices"] == 49
    assert len(summary["topic_devices"]) == 2
    assert ingestor.stats().rejected == {"malformed": 51}


def test_close_writes_the_summary_of_an_open_window(
    engine: Engine, audit: AuditLog, clock: Clock
) -> None:
    recorder = RejectionRecorder(audit, limits=RejectionLimits(events_per_window=0), clock=clock)

    assert recorder.record(RejectReason.REVOKED, None) is False
    recorder.close()

    (summary,) = _rejections(audit)
    assert summary["reasons"] == {"revoked": 1}
    assert summary["topic_devices"] == {"invalid": 1}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"events_per_window": -1}, "events_per_window"),
        ({"window": timedelta(0)}, "window must be"),
        ({"max_devices": 0}, "max_devices"),
    ],
)
def test_rejection_limits_are_checked(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RejectionLimits(**fields)


def test_the_recorder_needs_a_reject_reason(audit: AuditLog) -> None:
    with pytest.raises(ConfigError, match="not a RejectReason"):
        RejectionRecorder(audit).record("malformed", None)  # type: ignore[arg-type]


def test_the_ingestor_needs_a_32_byte_authority_key(engine: Engine, audit: AuditLog) -> None:
    with pytest.raises(ConfigError, match="32 bytes"):
        EventIngestor(
            EventStore(engine), authority_public_key=b"short", rejections=RejectionRecorder(audit)
        )


# --- registry standing ------------------------------------------------------------------


def test_revoked_and_unknown_devices_are_refused_through_the_registry(
    engine: Engine, audit: AuditLog, clock: Clock
) -> None:
    registry = DeviceRegistry(engine, audit)
    tokens = create_tokens(engine, 2, expires_at=NOW + timedelta(days=1), now=NOW, audit=audit)
    identities = []
    for number, token in enumerate(tokens):
        seed = DeterministicRandom(40 + number).random_bytes(32)
        enrolment = registry.enrol(
            token,
            supernode_public_key_pem=public_key_to_pem(
                ec.generate_private_key(ec.SECP256R1()).public_key()
            ),
            identity_public_key=signing_key_from_seed(seed).public_key().public_bytes_raw(),
            authority=AUTHORITY,
            now=NOW,
        )
        identities.append(NodeIdentity(signing_seed=seed, certificate=enrolment.certificate))
    active, revoked = identities
    registry.revoke(revoked.certificate.enrolment_id, "stolen", now=NOW)
    ingestor = EventIngestor(
        EventStore(engine),
        authority_public_key=AUTHORITY.public_key,
        rejections=RejectionRecorder(audit, clock=clock),
        standing=registry_standing(registry),
        clock=clock,
    )

    results = ingestor.ingest_many(
        [_message(_event(active, 1)), _message(_event(revoked, 1)), _message(_event(A, 1))]
    )

    assert [(r.outcome, r.reason) for r in results] == [
        (IngestOutcome.STORED, None),
        (IngestOutcome.REJECTED, RejectReason.REVOKED),
        (IngestOutcome.REJECTED, RejectReason.UNKNOWN_DEVICE),
    ]


def test_registry_standing_caches_for_its_ttl_and_revocation_for_good() -> None:
    class Registry:
        def __init__(self) -> None:
            self.calls = 0
            self.active = True

        def device(self, device_id: str) -> Any:
            self.calls += 1
            return type(
                "Device",
                (),
                {"identity_public_key": b"k" * 32, "is_active": self.active},
            )()

    registry = Registry()
    now = [0.0]
    lookup = registry_standing(registry, ttl_s=10, clock=lambda: now[0])  # type: ignore[arg-type]

    assert lookup("d", b"k" * 32) is DeviceStanding.ACTIVE
    assert lookup("d", b"k" * 32) is DeviceStanding.ACTIVE
    assert registry.calls == 1
    assert lookup("d", b"x" * 32) is DeviceStanding.UNKNOWN  # another key
    registry.active = False
    now[0] = 11.0
    assert lookup("d", b"k" * 32) is DeviceStanding.REVOKED
    registry.active = True
    now[0] = 1_000.0
    assert lookup("d", b"k" * 32) is DeviceStanding.REVOKED
    with pytest.raises(ConfigError, match="ttl_s"):
        registry_standing(registry, ttl_s=-1)  # type: ignore[arg-type]


def test_a_failing_listener_does_not_lose_the_batch(
    engine: Engine, audit: AuditLog, clock: Clock
) -> None:
    seen: list[int] = []

    def listener(events: Any) -> None:
        seen.extend(event.seq for event in events)
        raise RuntimeError("listener bug")

    ingestor = EventIngestor(
        EventStore(engine),
        authority_public_key=AUTHORITY.public_key,
        rejections=RejectionRecorder(audit, clock=clock),
        on_stored=listener,
        clock=clock,
    )

    results = ingestor.ingest_many([_message(_event(A, 1)), _message(_event(A, 1))])

    assert [r.outcome for r in results] == [IngestOutcome.STORED, IngestOutcome.DUPLICATE]
    assert seen == [1]
