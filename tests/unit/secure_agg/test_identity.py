from __future__ import annotations

import pytest

from fedge.errors import ConfigError
from secure_agg.crypto import signing_key_from_seed
from secure_agg.errors import CryptoError
from secure_agg.identity import MAX_ENROLMENT_ID, EnrolmentAuthority
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
