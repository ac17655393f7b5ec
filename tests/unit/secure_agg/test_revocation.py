"""The signed revocation list in the pure package: build, verify, and every refusal."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from fedge.errors import ConfigError
from secure_agg.crypto import sign
from secure_agg.errors import CryptoError
from secure_agg.identity import EnrolmentAuthority
from secure_agg.randomness import DeterministicRandom
from secure_agg.revocation import (
    CLOCK_SKEW,
    MAX_LIST_BYTES,
    REVOCATION_LIST_FORMAT,
    REVOCATION_LIST_LABEL,
    RevokedDevice,
    build_revocation_list,
    verify_revocation_list,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
AUTHORITY = EnrolmentAuthority.generate(DeterministicRandom(11))


def _revoked(*ids: str) -> list[RevokedDevice]:
    return [RevokedDevice(device_id=device_id, revoked_at=NOW) for device_id in ids]


def _signed(body: object) -> bytes:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    signature = sign(AUTHORITY.signing_seed, REVOCATION_LIST_LABEL + text.encode())
    return json.dumps({"body": text, "signature": signature.hex()}).encode()


def test_a_list_round_trips_with_its_sequence_time_and_ids() -> None:
    data = build_revocation_list(AUTHORITY, _revoked("dev-b", "dev-a"), sequence=3, now=NOW)

    parsed = verify_revocation_list(data, AUTHORITY.public_key, now=NOW, min_sequence=3)

    assert parsed.sequence == 3
    assert parsed.issued_at == NOW
    assert parsed.device_ids == frozenset({"dev-a", "dev-b"})
    assert [entry.device_id for entry in parsed.revoked] == ["dev-a", "dev-b"]


def test_fl_server_pki_reexports_the_same_objects() -> None:
    from fl_server import pki  # the cloud side keeps its names (not a secure_agg import)

    assert pki.verify_revocation_list is verify_revocation_list
    assert pki.build_revocation_list is build_revocation_list
    assert pki.RevokedDevice is RevokedDevice


def test_an_older_sequence_is_refused() -> None:
    data = build_revocation_list(AUTHORITY, _revoked("dev-a"), sequence=4, now=NOW)

    with pytest.raises(CryptoError):
        verify_revocation_list(data, AUTHORITY.public_key, now=NOW, min_sequence=5)


def test_a_list_from_the_verifiers_future_is_refused_beyond_the_skew() -> None:
    data = build_revocation_list(AUTHORITY, _revoked(), sequence=0, now=NOW)

    verify_revocation_list(data, AUTHORITY.public_key, now=NOW - CLOCK_SKEW)
    with pytest.raises(CryptoError):
        verify_revocation_list(data, AUTHORITY.public_key, now=NOW - CLOCK_SKEW - timedelta(1))


def test_a_list_older_than_max_age_is_refused() -> None:
    data = build_revocation_list(AUTHORITY, _revoked(), sequence=0, now=NOW)
    later = NOW + timedelta(days=2)

    verify_revocation_list(data, AUTHORITY.public_key, now=later, max_age=timedelta(days=3))
    with pytest.raises(CryptoError):
        verify_revocation_list(data, AUTHORITY.public_key, now=later, max_age=timedelta(days=1))


def test_another_authoritys_list_is_refused() -> None:
    impostor = EnrolmentAuthority.generate(DeterministicRandom(12))
    data = build_revocation_list(impostor, _revoked(), sequence=9, now=NOW)

    with pytest.raises(CryptoError):
        verify_revocation_list(data, AUTHORITY.public_key, now=NOW)


def test_an_identity_signature_is_not_a_list_signature() -> None:
    body = json.dumps(
        {"format": REVOCATION_LIST_FORMAT, "issued_at": NOW.isoformat(), "revoked": [],
         "sequence": 1},
        sort_keys=True,
        separators=(",", ":"),
    )  # fmt: skip
    unlabelled = sign(AUTHORITY.signing_seed, body.encode())
    data = json.dumps({"body": body, "signature": unlabelled.hex()}).encode()

    with pytest.raises(CryptoError):
        verify_revocation_list(data, AUTHORITY.public_key, now=NOW)


_TIME = NOW.isoformat()
_ENTRY = {"device_id": "dev-a", "revoked_at": _TIME}


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"format": REVOCATION_LIST_FORMAT, "issued_at": _TIME, "sequence": 1},
        {"format": "x/v9", "issued_at": _TIME, "revoked": [], "sequence": 1},
        {"format": REVOCATION_LIST_FORMAT, "issued_at": _TIME, "revoked": [], "sequence": -1},
        {"format": REVOCATION_LIST_FORMAT, "issued_at": _TIME, "revoked": [], "sequence": True},
        {"format": REVOCATION_LIST_FORMAT, "issued_at": _TIME, "revoked": {}, "sequence": 1},
        {"format": REVOCATION_LIST_FORMAT, "issued_at": _TIME, "revoked": [1], "sequence": 1},
        {"format": REVOCATION_LIST_FORMAT, "issued_at": "2026-03-01T12:00:00", "revoked": [],
         "sequence": 1},
        {"format": REVOCATION_LIST_FORMAT, "issued_at": 5, "revoked": [], "sequence": 1},
        {"format": REVOCATION_LIST_FORMAT, "issued_at": "soon", "revoked": [], "sequence": 1},
        {"format": REVOCATION_LIST_FORMAT, "issued_at": _TIME,
         "revoked": [{"device_id": "", "revoked_at": _TIME}], "sequence": 1},
        {"format": REVOCATION_LIST_FORMAT, "issued_at": _TIME,
         "revoked": [{"device_id": "dev-a"}], "sequence": 1},
        {"format": REVOCATION_LIST_FORMAT, "issued_at": _TIME, "revoked": [_ENTRY, _ENTRY],
         "sequence": 1},
    ],
)  # fmt: skip
def test_a_signed_but_malformed_body_is_refused_opaquely(body: object) -> None:
    with pytest.raises(CryptoError, match=r"^cryptographic verification failed$"):
        verify_revocation_list(_signed(body), AUTHORITY.public_key, now=NOW)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"body": "{}"}',
        b'{"body": 1, "signature": "00"}',
        b'{"body": "{}", "signature": "zz"}',
        b"\xff\xfe",
        "a string".encode("utf-16"),
        b" " * (MAX_LIST_BYTES + 1),
        "not bytes",
    ],
)
def test_a_malformed_envelope_is_refused_opaquely(data: object) -> None:
    with pytest.raises(CryptoError, match=r"^cryptographic verification failed$"):
        verify_revocation_list(data, AUTHORITY.public_key, now=NOW)  # type: ignore[arg-type]


def test_a_key_of_the_wrong_size_is_refused_opaquely() -> None:
    data = build_revocation_list(AUTHORITY, _revoked(), sequence=0, now=NOW)

    with pytest.raises(CryptoError):
        verify_revocation_list(data, b"\x01" * 31, now=NOW)


def test_verify_needs_an_aware_time_and_an_integer_sequence() -> None:
    data = build_revocation_list(AUTHORITY, _revoked(), sequence=0, now=NOW)

    with pytest.raises(ConfigError, match="timezone-aware"):
        verify_revocation_list(data, AUTHORITY.public_key, now=datetime(2026, 3, 1))
    with pytest.raises(ConfigError, match="min_sequence must be an integer"):
        verify_revocation_list(data, AUTHORITY.public_key, now=NOW, min_sequence=True)


@pytest.mark.parametrize(
    ("revoked", "sequence", "now", "match"),
    [
        (_revoked("dev-a"), -1, NOW, "non-negative integer"),
        (_revoked("dev-a"), True, NOW, "non-negative integer"),
        (_revoked("dev-a", "dev-a"), 2, NOW, "appears twice"),
        (_revoked(""), 1, NOW, "id is empty"),
        (_revoked("dev-a"), 1, datetime(2026, 3, 1), "timezone-aware"),
    ],
)
def test_build_refuses_bad_input(
    revoked: list[RevokedDevice], sequence: int, now: datetime, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        build_revocation_list(AUTHORITY, revoked, sequence=sequence, now=now)
