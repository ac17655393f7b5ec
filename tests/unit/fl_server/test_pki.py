from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge.errors import ConfigError
from fl_server.pki import (
    MAX_VALID_DAYS,
    REVOCATION_LIST_LABEL,
    RevokedDevice,
    build_revocation_list,
    certificate_to_pem,
    create_ca,
    issue_device_certificate,
    issue_server_certificate,
    load_certificate_pem,
    load_nist_public_key_pem,
    load_private_key_pem,
    private_key_to_pem,
    public_key_to_pem,
    verify_revocation_list,
)
from secure_agg.crypto import sign
from secure_agg.errors import CryptoError
from secure_agg.identity import EnrolmentAuthority
from secure_agg.randomness import DeterministicRandom

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return create_ca("fedge test CA", valid_days=365, now=NOW)


@pytest.fixture
def authority() -> EnrolmentAuthority:
    return EnrolmentAuthority.generate(DeterministicRandom(11))


def _cn(certificate: x509.Certificate) -> str:
    return str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


# --- the CA and the certificates it issues -------------------------------------------


def test_create_ca_makes_a_self_signed_p256_ca_valid_from_now(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    key, certificate = ca

    assert isinstance(key.curve, ec.SECP256R1)
    assert _cn(certificate) == "fedge test CA"
    assert certificate.not_valid_before_utc == NOW
    assert certificate.not_valid_after_utc == NOW + timedelta(days=365)
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca
    assert constraints.path_length == 0
    certificate.verify_directly_issued_by(certificate)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"common_name": ""}, "CN must have"),
        ({"common_name": "x" * 65}, "CN must have"),
        ({"common_name": "bad\nname"}, "printable"),
        ({"valid_days": 0}, "valid_days must be 1"),
        ({"valid_days": MAX_VALID_DAYS + 1}, "valid_days must be 1"),
        ({"valid_days": True}, "must be an integer"),
        ({"now": datetime(2026, 3, 1)}, "timezone-aware"),
    ],
)
def test_create_ca_refuses_bad_parameters(kwargs: dict[str, object], match: str) -> None:
    arguments: dict[str, object] = {"common_name": "ca", "valid_days": 10, "now": NOW}
    arguments.update(kwargs)

    with pytest.raises(ConfigError, match=match):
        create_ca(**arguments)  # type: ignore[arg-type]


def test_server_certificate_carries_its_sans_and_server_auth(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    key, certificate = issue_server_certificate(
        *ca, sans=["SuperLink.example.org", "10.0.0.5", "::1"], valid_days=30, now=NOW
    )

    certificate.verify_directly_issued_by(ca[1])
    assert certificate.public_key() == key.public_key()
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [ip_address("10.0.0.5"), ip_address("::1")]
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _cn(certificate) == "superlink.example.org"
    assert certificate.not_valid_after_utc == NOW + timedelta(days=30)


@pytest.mark.parametrize(
    ("sans", "match"),
    [
        ([], "needs 1..64 SANs"),
        ([f"h{i}.example" for i in range(65)], "needs 1..64 SANs"),
        ("superlink.example", "must be a list"),
        ([""], "is empty"),
        (["bad_name"], "neither an IP address nor a DNS name"),
        (["*.example.org"], "neither an IP address nor a DNS name"),
        (["a..b"], "neither an IP address nor a DNS name"),
        (["-a.example"], "neither an IP address nor a DNS name"),
        (["a" * 64 + ".example"], "neither an IP address nor a DNS name"),
        (["10.0.0.256"], "neither an IP address nor a DNS name"),
        (["host.example", "HOST.example"], "same name twice"),
    ],
)
def test_server_certificate_refuses_bad_sans(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], sans: object, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        issue_server_certificate(*ca, sans=sans, valid_days=30, now=NOW)  # type: ignore[arg-type]


def test_a_certificate_may_not_outlive_its_ca(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    with pytest.raises(ConfigError, match="would outlive the CA"):
        issue_server_certificate(*ca, sans=["localhost"], valid_days=366, now=NOW)


@pytest.mark.parametrize("now", [NOW - timedelta(seconds=1), NOW + timedelta(days=365)])
def test_a_ca_issues_only_while_it_is_valid(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], now: datetime
) -> None:
    with pytest.raises(ConfigError, match="not valid at the issue time"):
        issue_server_certificate(*ca, sans=["localhost"], valid_days=1, now=now)


def test_the_issuer_key_must_match_and_be_a_ca(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    other_key, _ = create_ca("other", valid_days=10, now=NOW)
    leaf_key, leaf = issue_server_certificate(*ca, sans=["localhost"], valid_days=1, now=NOW)

    with pytest.raises(ConfigError, match="does not belong to the CA certificate"):
        issue_server_certificate(other_key, ca[1], sans=["localhost"], valid_days=1, now=NOW)
    with pytest.raises(ConfigError, match="is not a CA"):
        issue_server_certificate(leaf_key, leaf, sans=["localhost"], valid_days=1, now=NOW)
    with pytest.raises(ConfigError, match="must be an EC private key"):
        issue_server_certificate(
            ed25519.Ed25519PrivateKey.generate(),  # type: ignore[arg-type]
            ca[1],
            sans=["localhost"],
            valid_days=1,
            now=NOW,
        )


def test_device_certificate_names_the_device_and_allows_client_auth(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    device_key = ec.generate_private_key(ec.SECP384R1())

    certificate = issue_device_certificate(
        *ca,
        device_id="dev-0123456789abcdef",
        public_key=device_key.public_key(),
        valid_days=30,
        now=NOW,
    )

    certificate.verify_directly_issued_by(ca[1])
    assert _cn(certificate) == "dev-0123456789abcdef"
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_device_certificate_refuses_a_bad_id_or_key(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    good = ec.generate_private_key(ec.SECP256R1()).public_key()
    koblitz = ec.generate_private_key(ec.SECP256K1()).public_key()

    with pytest.raises(ConfigError, match="device_id must have"):
        issue_device_certificate(*ca, device_id="", public_key=good, valid_days=1, now=NOW)
    with pytest.raises(ConfigError, match="NIST curve"):
        issue_device_certificate(*ca, device_id="dev-1", public_key=koblitz, valid_days=1, now=NOW)


# --- PEM helpers ------------------------------------------------------------------------


def test_pem_round_trips(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> None:
    key, certificate = ca

    assert load_certificate_pem(certificate_to_pem(certificate)) == certificate
    assert load_private_key_pem(private_key_to_pem(key)).public_key() == key.public_key()
    assert load_nist_public_key_pem(public_key_to_pem(key.public_key())) == key.public_key()
    assert load_nist_public_key_pem(public_key_to_pem(key.public_key()).encode()) == (
        key.public_key()
    )


def test_pem_loaders_refuse_what_they_do_not_expect() -> None:
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed_private_pem = private_key_to_pem(ed_key)  # type: ignore[arg-type]
    ed_public_pem = ed_key.public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )
    koblitz_pem = public_key_to_pem(ec.generate_private_key(ec.SECP256K1()).public_key())

    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        load_private_key_pem(b"garbage")
    with pytest.raises(ConfigError, match="not an EC key"):
        load_private_key_pem(ed_private_pem)
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        load_certificate_pem(b"garbage")
    with pytest.raises(ConfigError, match="not a PEM SubjectPublicKeyInfo"):
        load_nist_public_key_pem("garbage")
    with pytest.raises(ConfigError, match="not an EC key on a NIST curve"):
        load_nist_public_key_pem(ed_public_pem)
    with pytest.raises(ConfigError, match="not an EC key on a NIST curve"):
        load_nist_public_key_pem(koblitz_pem)
    with pytest.raises(ConfigError, match="a public key PEM has"):
        load_nist_public_key_pem("")
    with pytest.raises(ConfigError, match="a public key PEM has"):
        load_nist_public_key_pem("x" * 20_000)


# --- the signed revocation list ---------------------------------------------------------


def _revoked(*ids: str) -> list[RevokedDevice]:
    return [RevokedDevice(device_id=device_id, revoked_at=NOW) for device_id in ids]


def test_a_revocation_list_verifies_and_names_the_revoked_devices(
    authority: EnrolmentAuthority,
) -> None:
    data = build_revocation_list(authority, _revoked("dev-b", "dev-a"), sequence=2, now=NOW)

    parsed = verify_revocation_list(data, authority.public_key, now=NOW)

    assert parsed.device_ids == {"dev-a", "dev-b"}
    assert [entry.device_id for entry in parsed.revoked] == ["dev-a", "dev-b"]
    assert parsed.revoked[0].revoked_at == NOW
    assert (parsed.sequence, parsed.issued_at) == (2, NOW)


def test_the_revocation_list_body_is_canonical_and_labelled(
    authority: EnrolmentAuthority,
) -> None:
    data = build_revocation_list(authority, _revoked("dev-a"), sequence=1, now=NOW)
    envelope = json.loads(data)

    assert envelope["body"] == (
        '{"format":"fedge-revocation-list/v1","issued_at":"2026-03-01T12:00:00.000000+00:00",'
        '"revoked":[{"device_id":"dev-a","revoked_at":"2026-03-01T12:00:00.000000+00:00"}],'
        '"sequence":1}'
    )
    # The same body signed without the domain label does not verify.
    unlabelled = sign(authority.signing_seed, envelope["body"].encode())
    forged = json.dumps({"body": envelope["body"], "signature": unlabelled.hex()}).encode()
    with pytest.raises(CryptoError):
        verify_revocation_list(forged, authority.public_key, now=NOW)


def test_an_older_list_cannot_replace_a_newer_one(authority: EnrolmentAuthority) -> None:
    older = build_revocation_list(authority, _revoked("dev-a"), sequence=1, now=NOW)
    newer = build_revocation_list(authority, _revoked("dev-a", "dev-b"), sequence=2, now=NOW)

    accepted = verify_revocation_list(newer, authority.public_key, now=NOW, min_sequence=2)
    with pytest.raises(CryptoError, match=r"^cryptographic verification failed$"):
        verify_revocation_list(older, authority.public_key, now=NOW, min_sequence=2)
    assert accepted.sequence == 2


def test_a_list_from_the_future_or_too_old_is_refused(authority: EnrolmentAuthority) -> None:
    data = build_revocation_list(authority, _revoked(), sequence=0, now=NOW)

    verify_revocation_list(data, authority.public_key, now=NOW - timedelta(minutes=4))
    with pytest.raises(CryptoError):
        verify_revocation_list(data, authority.public_key, now=NOW - timedelta(minutes=6))
    verify_revocation_list(
        data, authority.public_key, now=NOW + timedelta(hours=1), max_age=timedelta(hours=1)
    )
    with pytest.raises(CryptoError):
        verify_revocation_list(
            data, authority.public_key, now=NOW + timedelta(hours=2), max_age=timedelta(hours=1)
        )


def test_a_list_signed_by_another_authority_or_altered_is_refused(
    authority: EnrolmentAuthority,
) -> None:
    impostor = EnrolmentAuthority.generate(DeterministicRandom(12))
    data = build_revocation_list(authority, _revoked("dev-a"), sequence=1, now=NOW)
    forged = build_revocation_list(impostor, _revoked(), sequence=9, now=NOW)
    altered = data.replace(b"dev-a", b"dev-z")

    for candidate in (forged, altered):
        with pytest.raises(CryptoError):
            verify_revocation_list(candidate, authority.public_key, now=NOW)


def _signed(authority: EnrolmentAuthority, body: str) -> bytes:
    signature = sign(authority.signing_seed, REVOCATION_LIST_LABEL + body.encode())
    return json.dumps({"body": body, "signature": signature.hex()}).encode()


_GOOD_TIME = "2026-03-01T12:00:00.000000+00:00"


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[]",
        json.dumps({"format": "fedge-revocation-list/v1", "issued_at": _GOOD_TIME, "sequence": 1}),
        json.dumps({"format": "other/v9", "issued_at": _GOOD_TIME, "revoked": [], "sequence": 1}),
        json.dumps(
            {
                "format": "fedge-revocation-list/v1",
                "issued_at": _GOOD_TIME,
                "revoked": [],
                "sequence": -1,
            }
        ),
        json.dumps(
            {
                "format": "fedge-revocation-list/v1",
                "issued_at": _GOOD_TIME,
                "revoked": [],
                "sequence": True,
            }
        ),
        json.dumps(
            {
                "format": "fedge-revocation-list/v1",
                "issued_at": _GOOD_TIME,
                "revoked": {},
                "sequence": 1,
            }
        ),
        json.dumps(
            {
                "format": "fedge-revocation-list/v1",
                "issued_at": "2026-03-01T12:00:00",
                "revoked": [],
                "sequence": 1,
            }
        ),
        json.dumps(
            {"format": "fedge-revocation-list/v1", "issued_at": 5, "revoked": [], "sequence": 1}
        ),
        json.dumps(
            {
                "format": "fedge-revocation-list/v1",
                "issued_at": "yesterday",
                "revoked": [],
                "sequence": 1,
            }
        ),
        json.dumps(
            {
                "format": "fedge-revocation-list/v1",
                "issued_at": _GOOD_TIME,
                "revoked": [{"device_id": "dev-a"}],
                "sequence": 1,
            }
        ),
        json.dumps(
            {
                "format": "fedge-revocation-list/v1",
                "issued_at": _GOOD_TIME,
                "revoked": [{"device_id": "", "revoked_at": _GOOD_TIME}],
                "sequence": 1,
            }
        ),
        json.dumps(
            {
                "format": "fedge-revocation-list/v1",
                "issued_at": _GOOD_TIME,
                "revoked": [{"device_id": "dev-a", "revoked_at": _GOOD_TIME}] * 2,
                "sequence": 2,
            }
        ),
    ],
)
def test_a_signed_but_malformed_body_is_refused_opaquely(
    authority: EnrolmentAuthority, body: str
) -> None:
    with pytest.raises(CryptoError, match=r"^cryptographic verification failed$"):
        verify_revocation_list(_signed(authority, body), authority.public_key, now=NOW)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b'{"body": "x"}',
        b'{"body": 1, "signature": "00"}',
        b'{"body": "x", "signature": "zz"}',
        "not bytes",
        b"x" * (16 * 1024 * 1024 + 1),
    ],
)
def test_a_malformed_envelope_is_refused_opaquely(
    authority: EnrolmentAuthority, data: object
) -> None:
    with pytest.raises(CryptoError, match=r"^cryptographic verification failed$"):
        verify_revocation_list(data, authority.public_key, now=NOW)  # type: ignore[arg-type]


def test_verify_needs_an_aware_time(authority: EnrolmentAuthority) -> None:
    data = build_revocation_list(authority, _revoked(), sequence=0, now=NOW)

    with pytest.raises(ConfigError, match="timezone-aware"):
        verify_revocation_list(data, authority.public_key, now=datetime(2026, 3, 1))


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
    authority: EnrolmentAuthority,
    revoked: list[RevokedDevice],
    sequence: int,
    now: datetime,
    match: str,
) -> None:
    with pytest.raises(ConfigError, match=match):
        build_revocation_list(authority, revoked, sequence=sequence, now=now)
