"""Device-signed requests with expiring (version-2) identity certificates."""

from __future__ import annotations

import pytest

from secure_agg.errors import CryptoError
from secure_agg.identity import EnrolmentAuthority
from secure_agg.randomness import DeterministicRandom
from secure_agg.request_auth import authorization_header, verify_authorization

AUTHORITY = EnrolmentAuthority.generate(DeterministicRandom(1))
EXPIRES = 2_000_000_000


def _header(expires_at: int | None, timestamp: int) -> str:
    device = AUTHORITY.enrol("dev-abc", DeterministicRandom(2), expires_at=expires_at)
    return authorization_header(device, method="GET", target="/v1/x", timestamp=timestamp)


def _verify(header: str, now: int) -> str:
    return verify_authorization(
        header, method="GET", target="/v1/x", authority_public_key=AUTHORITY.public_key, now=now
    ).enrolment_id


@pytest.mark.parametrize("expires_at", [None, EXPIRES])
def test_a_request_with_a_valid_certificate_verifies(expires_at: int | None) -> None:
    assert _verify(_header(expires_at, EXPIRES - 10), EXPIRES - 10) == "dev-abc"


def test_a_request_after_the_certificate_expired_is_refused() -> None:
    with pytest.raises(CryptoError):
        _verify(_header(EXPIRES, EXPIRES + 10), EXPIRES + 10)


@pytest.mark.parametrize("edit", ["drop", "extend"])
def test_an_edited_expiry_is_refused(edit: str) -> None:
    header = _header(EXPIRES, EXPIRES + 10)
    forged = (
        header.replace(f"exp={EXPIRES}, ", "")
        if edit == "drop"
        else header.replace(f"exp={EXPIRES}", f"exp={EXPIRES + 10**6}")
    )
    with pytest.raises(CryptoError):
        _verify(forged, EXPIRES + 10)
