from __future__ import annotations

from dataclasses import replace

import pytest

from fedge.errors import ConfigError
from secure_agg.crypto import signing_key_from_seed
from secure_agg.errors import CryptoError
from secure_agg.identity import MAX_ENROLMENT_ID, MAX_EXPIRES_AT, EnrolmentAuthority
from secure_agg.randomness import DeterministicRandom


def _device_public_key(seed: int) -> bytes:
    private_seed = DeterministicRandom(seed).random_bytes(32)
    return signing_key_from_seed(private_seed).public_key().public_bytes_raw()


def test_certify_binds_a_device_made_key_to_its_id() -> None:
    authority = EnrolmentAuthority.generate(DeterministicRandom(1))
    public = _device_public_key(2)

    certificate = authority.certify("dev-01", public)

    assert (certificate.enrolment_id, certificate.public_key) == ("dev-01", public)
    certificate.verify(authority.public_key)


def test_a_certificate_from_certify_fails_for_another_authority() -> None:
    authority = EnrolmentAuthority.generate(DeterministicRandom(1))
    other = EnrolmentAuthority.generate(DeterministicRandom(3))

    certificate = authority.certify("dev-01", _device_public_key(2))

    with pytest.raises(CryptoError):
        certificate.verify(other.public_key)


def test_certify_matches_enrol_for_the_same_key() -> None:
    authority = EnrolmentAuthority.generate(DeterministicRandom(1))
    identity = authority.enrol("dev-01", DeterministicRandom(4))

    certificate = authority.certify("dev-01", identity.certificate.public_key)

    assert certificate == identity.certificate


@pytest.mark.parametrize(
    "enrolment_id", ["", "x" * (MAX_ENROLMENT_ID + 1), "é" * (MAX_ENROLMENT_ID + 1)]
)
def test_certify_refuses_an_empty_or_long_id(enrolment_id: str) -> None:
    authority = EnrolmentAuthority.generate(DeterministicRandom(1))

    with pytest.raises(ConfigError, match="enrolment ids have"):
        authority.certify(enrolment_id, _device_public_key(2))


@pytest.mark.parametrize("public_key", [b"", b"\x01" * 31, b"\x01" * 33])
def test_certify_refuses_a_key_of_the_wrong_size(public_key: bytes) -> None:
    authority = EnrolmentAuthority.generate(DeterministicRandom(1))

    with pytest.raises(ConfigError, match="exactly 32 bytes"):
        authority.certify("dev-01", public_key)


# --- certificate expiry (version 2) ----------------------------------------------------

EXPIRY = 1_800_000_000


def test_an_expiring_certificate_verifies_before_its_expiry_only() -> None:
    authority = EnrolmentAuthority.generate(DeterministicRandom(1))

    certificate = authority.certify("dev-01", _device_public_key(2), expires_at=EXPIRY)

    assert certificate.expires_at == EXPIRY
    certificate.verify(authority.public_key)
    certificate.verify_at_time(authority.public_key, EXPIRY - 1)
    for now in (EXPIRY, EXPIRY + 1, None):
        with pytest.raises(CryptoError):
            certificate.verify_at_time(authority.public_key, now)


def test_a_certificate_without_expiry_verifies_at_any_time() -> None:
    authority = EnrolmentAuthority.generate(DeterministicRandom(1))

    certificate = authority.certify("dev-01", _device_public_key(2))

    assert certificate.expires_at is None
    for now in (0, EXPIRY, None):
        certificate.verify_at_time(authority.public_key, now)


def test_enrol_passes_the_expiry_to_the_certificate() -> None:
    authority = EnrolmentAuthority.generate(DeterministicRandom(1))

    identity = authority.enrol("dev-01", DeterministicRandom(4), expires_at=EXPIRY)

    assert identity.certificate.expires_at == EXPIRY
    identity.certificate.verify_at_time(authority.public_key, EXPIRY - 1)


@pytest.mark.parametrize("expires_at", [EXPIRY + 1, EXPIRY - 1, None, MAX_EXPIRES_AT])
def test_the_expiry_is_signed_and_cannot_be_changed_or_stripped(expires_at: int | None) -> None:
    authority = EnrolmentAuthority.generate(DeterministicRandom(1))
    certificate = authority.certify("dev-01", _device_public_key(2), expires_at=EXPIRY)

    altered = replace(certificate, expires_at=expires_at)

    with pytest.raises(CryptoError):
        altered.verify(authority.public_key)


def test_a_certificate_without_expiry_cannot_be_given_one() -> None:
    authority = EnrolmentAuthority.generate(DeterministicRandom(1))
    certificate = authority.certify("dev-01", _device_public_key(2))

    with pytest.raises(CryptoError):
        replace(certificate, expires_at=EXPIRY).verify(authority.public_key)


@pytest.mark.parametrize("expires_at", [0, -1, MAX_EXPIRES_AT + 1, True, 1.5, "1800000000"])
def test_certify_refuses_an_expiry_out_of_range(expires_at: object) -> None:
    authority = EnrolmentAuthority.generate(DeterministicRandom(1))

    with pytest.raises(ConfigError, match="expires_at must be an integer of Unix seconds"):
        authority.certify("dev-01", _device_public_key(2), expires_at=expires_at)  # type: ignore[arg-type]


@pytest.mark.parametrize("expires_at", [0, -1, MAX_EXPIRES_AT + 1, True])
def test_a_certificate_with_an_expiry_out_of_range_fails_opaquely(expires_at: object) -> None:
    authority = EnrolmentAuthority.generate(DeterministicRandom(1))
    certificate = authority.certify("dev-01", _device_public_key(2), expires_at=EXPIRY)

    with pytest.raises(CryptoError):
        replace(certificate, expires_at=expires_at).verify(authority.public_key)  # type: ignore[arg-type]


@pytest.mark.parametrize("now", [1.5, "1", True])
def test_verify_at_time_needs_integer_seconds(now: object) -> None:
    authority = EnrolmentAuthority.generate(DeterministicRandom(1))
    certificate = authority.certify("dev-01", _device_public_key(2), expires_at=EXPIRY)

    with pytest.raises(ConfigError, match="now must be an integer of Unix seconds"):
        certificate.verify_at_time(authority.public_key, now)  # type: ignore[arg-type]
