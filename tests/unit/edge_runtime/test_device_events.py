"""The signed device-event envelope: round trip, verification, every parser branch, the sequence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edge_runtime._json import canonical_bytes
from edge_runtime.device_events import (
    EVENT_FORMAT,
    MAX_BODY_BYTES,
    MAX_EVENT_BYTES,
    MAX_SEQ,
    DeviceEvent,
    EventKind,
    EventMalformed,
    EventSequence,
    check_device_id,
    parse_event,
    sign_event,
    verify_event,
)
from fedge.errors import ConfigError, StorageError
from secure_agg.errors import CryptoError
from secure_agg.identity import EnrolmentAuthority, NodeIdentity
from secure_agg.randomness import DeterministicRandom

AUTHORITY = EnrolmentAuthority.generate(DeterministicRandom(1))
EXPIRES = 2_000_000_000
NOW = EXPIRES - 1_000
DEVICE = "dev-00000000000000aa"
OTHER = "dev-00000000000000bb"
IDENTITY = AUTHORITY.enrol(DEVICE, DeterministicRandom(2), expires_at=EXPIRES)
OTHER_IDENTITY = AUTHORITY.enrol(OTHER, DeterministicRandom(3), expires_at=EXPIRES)


def _event(
    identity: NodeIdentity = IDENTITY, seq: int = 1, body: dict[str, Any] | None = None
) -> DeviceEvent:
    return sign_event(
        identity,
        seq=seq,
        kind=EventKind.HEALTH,
        body={"error_rate": 0.01, "p95_ms": 3.5} if body is None else body,
        time=float(NOW),
    )


def _document(event: DeviceEvent | None = None) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((event or _event()).to_bytes())
    return document


def _payload(document: dict[str, Any]) -> bytes:
    return canonical_bytes(document)


def _verify(event: DeviceEvent, *, now: int = NOW, authority: bytes | None = None) -> None:
    verify_event(event, authority_public_key=authority or AUTHORITY.public_key, now=now)


# --- round trip and verification -------------------------------------------------------


def test_an_event_round_trips_through_its_wire_form_and_verifies() -> None:
    event = _event(seq=7, body={"nested": {"values": [1, 2.5, None, True]}, "text": "é"})

    parsed = parse_event(event.to_bytes())

    assert parsed == event
    assert parsed.body == {"nested": {"values": [1, 2.5, None, True]}, "text": "é"}
    assert parsed.to_json()["format"] == EVENT_FORMAT
    _verify(parsed)


def test_the_signature_covers_a_domain_separation_label() -> None:
    event = _event()

    assert event.signed_message().startswith(b"fedge/device-event/v1\x00{")
    assert canonical_bytes({**_document(event), "signature": None})  # every field is JSON


def test_a_version_1_certificate_without_expiry_round_trips() -> None:
    identity = AUTHORITY.enrol(DEVICE, DeterministicRandom(4))

    event = parse_event(_event(identity).to_bytes())

    assert "expires_at" not in _document(event)["certificate"]
    _verify(event)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seq", 8),
        ("kind", "crash"),
        ("time", float(NOW + 1)),
        ("body", {"error_rate": 0.99, "p95_ms": 3.5}),
        ("device", OTHER),
    ],
)
def test_a_field_edited_after_signing_fails_verification(field: str, value: object) -> None:
    document = {**_document(), field: value}

    with pytest.raises(CryptoError):
        _verify(parse_event(_payload(document)))


def test_a_forged_signature_fails_verification() -> None:
    document = {**_document(), "signature": "00" * 64}

    with pytest.raises(CryptoError):
        _verify(parse_event(_payload(document)))


def test_another_devices_certificate_does_not_verify_an_event() -> None:
    # Device A signs with its own key but presents B's certificate (B's id and key).
    forged = {**_document(), "certificate": _document(_event(OTHER_IDENTITY))["certificate"]}
    forged["device"] = OTHER

    with pytest.raises(CryptoError):
        _verify(parse_event(_payload(forged)))


def test_an_event_naming_a_device_its_certificate_does_not_is_refused() -> None:
    event = _event()
    renamed = DeviceEvent(
        device=OTHER,
        seq=event.seq,
        kind=event.kind,
        time=event.time,
        body_json=event.body_json,
        certificate=event.certificate,
        signature=event.signature,
    )

    with pytest.raises(CryptoError):
        _verify(renamed)


def test_a_certificate_of_another_authority_or_expired_is_refused() -> None:
    other_authority = EnrolmentAuthority.generate(DeterministicRandom(9))

    with pytest.raises(CryptoError):
        _verify(_event(), authority=other_authority.public_key)
    with pytest.raises(CryptoError):
        _verify(_event(), now=EXPIRES)


# --- signing ----------------------------------------------------------------------------


def test_sign_event_accepts_an_integer_time() -> None:
    event = sign_event(IDENTITY, seq=1, kind=EventKind.DRIFT, body={}, time=NOW)

    assert event.time == float(NOW)
    assert type(event.time) is float


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"x": "a" * MAX_BODY_BYTES}, "more than 15360"),
        ({"x": float("nan")}, "finite, plain JSON"),
        ({"x": {1, 2}}, "finite, plain JSON"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_sign_event_refuses_a_body_that_is_not_small_plain_json(body: Any, message: str) -> None:
    with pytest.raises(EventMalformed, match=message):
        sign_event(IDENTITY, seq=1, kind=EventKind.TELEMETRY, body=body, time=1.0)


def test_sign_event_refuses_a_deeply_nested_body() -> None:
    body: dict[str, Any] = {}
    for _ in range(100_000):
        body = {"x": body}

    with pytest.raises(EventMalformed, match="nested too deeply"):
        sign_event(IDENTITY, seq=1, kind=EventKind.TELEMETRY, body=body, time=1.0)


def test_sign_event_needs_a_node_identity() -> None:
    with pytest.raises(ConfigError, match="NodeIdentity"):
        sign_event("dev-1", seq=1, kind=EventKind.HEALTH, body={}, time=1.0)  # type: ignore[arg-type]


def test_a_body_at_the_limit_still_fits_the_envelope() -> None:
    body = {"x": "a" * (MAX_BODY_BYTES - len('{"x":""}'))}

    event = sign_event(IDENTITY, seq=MAX_SEQ, kind=EventKind.TELEMETRY, body=body, time=1.5)

    assert len(event.body_json) == MAX_BODY_BYTES
    assert len(event.to_bytes()) <= MAX_EVENT_BYTES
    assert parse_event(event.to_bytes()) == event


# --- the strict parser ------------------------------------------------------------------


def _edited(**changes: object) -> bytes:
    document = _document()
    for key, value in changes.items():
        if value is _DELETE:
            del document[key]
        else:
            document[key] = value
    return _payload(document)


def _certificate_edited(**changes: object) -> bytes:
    document = _document()
    certificate = document["certificate"]
    for key, value in changes.items():
        if value is _DELETE:
            del certificate[key]
        else:
            certificate[key] = value
    return _payload(document)


_DELETE = object()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"x" * (MAX_EVENT_BYTES + 1), "more than 16384"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1,2]", "must be a JSON object"),
        (b'{"a":1,"a":2}', "duplicate key 'a'"),
        (b'{"a":NaN}', "NaN is not a JSON number"),
        (b"[" * 8_000 + b"]" * 8_000, "not JSON"),
        (_edited(seq=_DELETE), r"missing \['seq'\]"),
        (_edited(extra=1), r"unknown \['extra'\]"),
        (_edited(format="fedge/device-event/v2"), "format must be"),
        (_edited(kind="reboot"), "unknown kind 'reboot'"),
        (_edited(kind=3), "unknown kind 3"),
        (_edited(device="dev/1"), "a device id has"),
        (_edited(device="+"), "a device id has"),
        (_edited(device=""), "a device id has"),
        (_edited(device="d" * 129), "a device id has"),
        (_edited(device=5), "a device id has"),
        (_edited(seq=0), "seq must be an int"),
        (_edited(seq=-1), "seq must be an int"),
        (_edited(seq=MAX_SEQ + 1), "seq must be an int"),
        (_edited(seq=True), "seq must be an int"),
        (_edited(seq=1.0), "seq must be an int"),
        (_edited(time=NOW), "time must be a finite float"),
        (_edited(time=-1.0), "time must be a finite float"),
        (_edited(time=0.0), "time must be a finite float"),
        (_edited(time="now"), "time must be a finite float"),
        (_edited(body=[]), "body must be a JSON object"),
        (_edited(body={"x": "a" * MAX_BODY_BYTES}), "more than 16384|more than 15360"),
        (_edited(certificate="cert"), "certificate must be a JSON object"),
        (_certificate_edited(public_key=_DELETE), "certificate must have"),
        (_certificate_edited(serial=1), "certificate must have"),
        (_certificate_edited(public_key="AB" * 32), "public_key must be 64 lowercase hex"),
        (_certificate_edited(public_key="ab" * 31), "public_key must be 64 lowercase hex"),
        (_certificate_edited(signature="zz" * 64), "signature must be 128 lowercase hex"),
        (_certificate_edited(signature=5), "signature must be 128 lowercase hex"),
        (_certificate_edited(expires_at=0), "expires_at must be an int"),
        (_certificate_edited(expires_at=True), "expires_at must be an int"),
        (_certificate_edited(expires_at="1"), "expires_at must be an int"),
        (_certificate_edited(enrolment_id="a b"), "a device id has"),
        (_edited(signature="ab" * 63), "signature must be 128 lowercase hex"),
        (_edited(signature="AB" * 64), "signature must be 128 lowercase hex"),
    ],
)
def test_the_parser_refuses_every_malformed_field(payload: bytes, message: str) -> None:
    with pytest.raises(EventMalformed, match=message):
        parse_event(payload)


def test_the_parser_refuses_a_non_canonical_payload() -> None:
    document = _document()
    spaced = json.dumps(document, sort_keys=True).encode()
    unsorted = json.dumps(dict(reversed(list(document.items()))), separators=(",", ":")).encode()

    for payload in (spaced, unsorted, _payload(document) + b"\n"):
        with pytest.raises(EventMalformed, match="canonical form"):
            parse_event(payload)


def test_the_parser_refuses_anything_but_bytes() -> None:
    with pytest.raises(EventMalformed, match="a payload is bytes"):
        parse_event(_event().to_bytes().decode())  # type: ignore[arg-type]


def test_a_parsed_body_is_a_copy() -> None:
    event = _event()

    event.body["error_rate"] = 1.0

    assert event.body["error_rate"] == 0.01


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "health"}, "kind must be an EventKind"),
        ({"body_json": "{}"}, "body_json must be bytes"),
        ({"body_json": b"{not"}, "body_json is not JSON"),
        ({"body_json": b'{"b":1, "a":2}'}, "not in canonical form"),
        ({"signature": b"x" * 63}, "signature must be 64 bytes"),
        ({"certificate": "cert"}, "certificate must be an IdentityCertificate"),
    ],
)
def test_the_event_type_checks_its_fields(changes: dict[str, object], message: str) -> None:
    event = _event()
    fields: dict[str, object] = {
        "device": event.device,
        "seq": event.seq,
        "kind": event.kind,
        "time": event.time,
        "body_json": event.body_json,
        "certificate": event.certificate,
        "signature": event.signature,
        **changes,
    }

    with pytest.raises(EventMalformed, match=message):
        DeviceEvent(**fields)  # type: ignore[arg-type]


def test_check_device_id_accepts_registry_ids_and_refuses_topic_wildcards() -> None:
    assert check_device_id("dev-0123456789abcdef") == "dev-0123456789abcdef"
    for bad in ("#", "a/b", "a b", "-a", "a\x00"):
        with pytest.raises(EventMalformed):
            check_device_id(bad)


# --- the sequence -----------------------------------------------------------------------


def test_the_sequence_starts_at_one_and_never_reuses_a_number_after_a_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sequence.json"
    sequence = EventSequence(path, DEVICE, lease=4)
    first = [sequence.next() for _ in range(6)]

    reopened = EventSequence(path, DEVICE, lease=4)

    assert first == [1, 2, 3, 4, 5, 6]
    assert reopened.last == 8  # 7 and 8 were reserved: skipped, never reused
    assert reopened.next() == 9
    assert json.loads(path.read_bytes())["reserved"] == 12


def test_the_sequence_writes_once_per_lease(tmp_path: Path) -> None:
    path = tmp_path / "sequence.json"
    sequence = EventSequence(path, DEVICE, lease=64)
    sequence.next()
    written = path.stat().st_mtime_ns

    for _ in range(63):
        sequence.next()

    assert path.stat().st_mtime_ns == written
    assert json.loads(path.read_bytes())["reserved"] == 64
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_the_sequence_of_another_device_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sequence.json"
    EventSequence(path, DEVICE).next()

    with pytest.raises(StorageError, match="belongs to device"):
        EventSequence(path, OTHER)


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"format":"fedge/device-event-seq/v1","device":"dev-00000000000000aa"}',
        b'{"format":"x","device":"dev-00000000000000aa","reserved":1}',
        b'{"format":"fedge/device-event-seq/v1","device":"dev-00000000000000aa","reserved":-1}',
        b'{"format":"fedge/device-event-seq/v1","device":"dev-00000000000000aa","reserved":true}',
    ],
)
def test_a_corrupt_sequence_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "sequence.json"
    path.write_bytes(content)

    with pytest.raises(StorageError, match="is corrupt"):
        EventSequence(path, DEVICE)


@pytest.mark.parametrize(("lease", "device"), [(0, DEVICE), (True, DEVICE), (1, "a/b")])
def test_the_sequence_checks_its_arguments(tmp_path: Path, lease: int, device: str) -> None:
    with pytest.raises(ConfigError):
        EventSequence(tmp_path / "s.json", device, lease=lease)


def test_a_sequence_that_cannot_be_written_hands_out_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sequence = EventSequence(tmp_path / "sequence.json", DEVICE)

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("edge_runtime.device_events.write_atomically", fail)

    with pytest.raises(StorageError, match="cannot reserve"):
        sequence.next()
    assert sequence.last == 0
