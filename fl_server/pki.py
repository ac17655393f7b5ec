"""The deployment's private PKI: a TLS certificate authority and the signed revocation list.

Two keys, two jobs:

- an ECDSA P-256 **TLS CA** (X.509) issues the SuperLink's server certificate
  (``serverAuth``, the SANs devices connect to) and, where wanted, device client
  certificates (``clientAuth``, CN = device id);
- the secure-aggregation **enrolment authority** (Ed25519, see
  :mod:`secure_agg.identity`) signs the revocation list, because its public key
  is what every device pins in its policy at enrolment.

Every function here is pure apart from key generation and serial numbers (the
operating system's CSPRNG): times are ``now=`` parameters, never the wall clock.

Notes
-----
Revocation list format (version 1). ``build_revocation_list`` returns the
UTF-8 JSON envelope ``{"body": BODY, "signature": HEX}``, where ``BODY`` is a
string holding canonical JSON (sorted keys, no spaces, ASCII)::

    {"format": "fedge-revocation-list/v1", "issued_at": ISO-8601 UTC,
     "revoked": [{"device_id": ..., "revoked_at": ...}, ...] (sorted by id),
     "sequence": N}

and ``HEX`` is the Ed25519 signature of ``REVOCATION_LIST_LABEL + BODY`` by the
authority. The label keeps a revocation-list signature from ever being valid as
an identity certificate or any other authority signature, and vice versa.

The sequence number orders lists: the registry issues a larger number whenever
the revoked set grows, and only ever one revoked set per number. A device keeps
the largest sequence it has accepted and passes it as ``min_sequence``, so a
server (the adversary) cannot replay an older list to un-revoke a device; a list
issued in the future is refused too, and ``max_age`` bounds how stale a list
may be. Every failure (bad signature, malformed body, replayed or stale list)
raises the same opaque :class:`~secure_agg.errors.CryptoError`.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge.errors import ConfigError
from secure_agg.crypto import sign, verify_signature
from secure_agg.errors import CryptoError
from secure_agg.identity import EnrolmentAuthority

__all__ = [
    "MAX_VALID_DAYS",
    "NIST_CURVES",
    "REVOCATION_LIST_FORMAT",
    "REVOCATION_LIST_LABEL",
    "RevocationList",
    "RevokedDevice",
    "build_revocation_list",
    "certificate_to_pem",
    "create_ca",
    "issue_device_certificate",
    "issue_server_certificate",
    "load_certificate_pem",
    "load_nist_public_key_pem",
    "load_private_key_pem",
    "private_key_to_pem",
    "public_key_to_pem",
    "verify_revocation_list",
]

MAX_VALID_DAYS = 3650
NIST_CURVES: tuple[type[ec.EllipticCurve], ...] = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
REVOCATION_LIST_FORMAT = "fedge-revocation-list/v1"
REVOCATION_LIST_LABEL = b"fedge/revocation-list/v1\x00"

_MAX_SANS = 64
_MAX_PEM_BYTES = 16 * 1024
_MAX_LIST_BYTES = 16 * 1024 * 1024
_MAX_COMMON_NAME = 64
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# A device's clock may run a little ahead of the authority's.
_CLOCK_SKEW = timedelta(minutes=5)

PrivateKey = ec.EllipticCurvePrivateKey


def _check_now(now: datetime) -> datetime:
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise ConfigError("now must be a timezone-aware datetime")
    return now.astimezone(UTC)


def _check_days(valid_days: int) -> timedelta:
    if isinstance(valid_days, bool) or not isinstance(valid_days, int):
        raise ConfigError(f"valid_days must be an integer, got {valid_days!r}")
    if not 1 <= valid_days <= MAX_VALID_DAYS:
        raise ConfigError(f"valid_days must be 1..{MAX_VALID_DAYS}, got {valid_days}")
    return timedelta(days=valid_days)


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_COMMON_NAME:
        raise ConfigError(f"{what} must have 1..{_MAX_COMMON_NAME} characters")
    if not value.isprintable():
        raise ConfigError(f"{what} must be printable")
    return value


def _parse_san(entry: str) -> x509.GeneralName:
    if not isinstance(entry, str) or not entry:
        raise ConfigError(f"SAN {entry!r} is empty or not a string")
    try:
        return x509.IPAddress(ipaddress.ip_address(entry))
    except ValueError:
        pass
    name = entry.lower()
    labels = name.split(".")
    # An all-digit last label is a mistyped IP address (``10.0.0.256``), not a host name.
    if (
        len(name) > 253
        or not all(_DNS_LABEL.match(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise ConfigError(
            f"SAN {entry!r} is neither an IP address nor a DNS name "
            "(letters, digits and hyphens in dot-separated labels, no wildcards)"
        )
    return x509.DNSName(name)


def _parse_sans(sans: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(sans, str) or not isinstance(sans, Sequence):
        raise ConfigError("sans must be a list of DNS names and IP addresses")
    if not 0 < len(sans) <= _MAX_SANS:
        raise ConfigError(f"a server certificate needs 1..{_MAX_SANS} SANs, got {len(sans)}")
    names = [_parse_san(entry) for entry in sans]
    if len(set(names)) != len(names):
        raise ConfigError("sans holds the same name twice")
    return names


def _check_issuer(ca_key: PrivateKey, ca_cert: x509.Certificate) -> None:
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the CA key must be an EC private key")
    if ca_key.public_key() != ca_cert.public_key():
        raise ConfigError("the CA key does not belong to the CA certificate")
    constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if not constraints.ca:
        raise ConfigError("the issuing certificate is not a CA")


def _leaf_builder(
    ca_cert: x509.Certificate,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    *,
    valid_days: int,
    now: datetime,
) -> x509.CertificateBuilder:
    moment = _check_now(now)
    expires = moment + _check_days(valid_days)
    if not ca_cert.not_valid_before_utc <= moment < ca_cert.not_valid_after_utc:
        raise ConfigError("the CA certificate is not valid at the issue time")
    if expires > ca_cert.not_valid_after_utc:
        raise ConfigError(
            f"a certificate valid for {valid_days} days would outlive the CA "
            f"(valid until {ca_cert.not_valid_after_utc.isoformat()})"
        )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment)
        .not_valid_after(expires)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
    )


def create_ca(
    common_name: str, *, valid_days: int, now: datetime
) -> tuple[PrivateKey, x509.Certificate]:
    """Create a self-signed ECDSA P-256 certificate authority.

    Parameters
    ----------
    common_name
        The CA's subject CN, 1..64 printable characters.
    valid_days
        Lifetime from ``now``, 1..``MAX_VALID_DAYS`` days.
    now
        The issue time (timezone-aware).

    Returns
    -------
    tuple
        The CA's private key and certificate (``pathLen=0``: it issues leaves only).

    Raises
    ------
    ConfigError
        If a parameter is out of range.
    """
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _check_name(common_name, "CN"))])
    moment = _check_now(now)
    lifetime = _check_days(valid_days)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment)
        .not_valid_after(moment + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def issue_server_certificate(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    *,
    sans: Sequence[str],
    valid_days: int,
    now: datetime,
) -> tuple[PrivateKey, x509.Certificate]:
    """Issue a TLS server certificate (``serverAuth``) with a fresh P-256 key.

    Parameters
    ----------
    ca_key, ca_cert
        The issuing CA (from :func:`create_ca`).
    sans
        The DNS names and IP addresses clients connect to; the first is also the CN.
    valid_days
        Lifetime from ``now``; the certificate may not outlive the CA.
    now
        The issue time (timezone-aware).

    Returns
    -------
    tuple
        The server's private key and certificate.

    Raises
    ------
    ConfigError
        If ``sans`` is empty, too long, repeats a name or holds an entry that is
        neither an IP address nor a DNS name; if the CA is not valid at ``now``
        or the key does not match it; if a parameter is out of range.
    """
    names = _parse_sans(sans)
    _check_issuer(ca_key, ca_cert)
    key = ec.generate_private_key(ec.SECP256R1())
    first = names[0].value
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(first)[:_MAX_COMMON_NAME])])
    certificate = (
        _leaf_builder(ca_cert, subject, key.public_key(), valid_days=valid_days, now=now)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, certificate


def issue_device_certificate(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    *,
    device_id: str,
    public_key: ec.EllipticCurvePublicKey,
    valid_days: int,
    now: datetime,
) -> x509.Certificate:
    """Issue a TLS client certificate (``clientAuth``, CN = ``device_id``) for a device's key.

    Raises
    ------
    ConfigError
        If the device id is empty or too long, the key is not on a NIST curve,
        the CA is not valid at ``now`` or a parameter is out of range.
    """
    _check_name(device_id, "device_id")
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, NIST_CURVES
    ):
        raise ConfigError("a device key must be an EC public key on a NIST curve")
    _check_issuer(ca_key, ca_cert)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    return (
        _leaf_builder(ca_cert, subject, public_key, valid_days=valid_days, now=now)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def private_key_to_pem(key: PrivateKey) -> bytes:
    """Serialise ``key`` as unencrypted PKCS#8 PEM (store it with ``write_secret``)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key_pem(data: bytes) -> PrivateKey:
    """Load an unencrypted EC private key; ConfigError (without the key) if it is not one."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError("not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the PEM private key is not an EC key")
    return key


def certificate_to_pem(certificate: x509.Certificate) -> bytes:
    """Serialise ``certificate`` as PEM."""
    return certificate.public_bytes(serialization.Encoding.PEM)


def load_certificate_pem(data: bytes) -> x509.Certificate:
    """Load one PEM certificate; ConfigError if it does not parse."""
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError("not a PEM certificate") from exc


def public_key_to_pem(key: ec.EllipticCurvePublicKey) -> str:
    """Serialise ``key`` as SubjectPublicKeyInfo PEM text (the registry's stored form)."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_nist_public_key_pem(data: str | bytes) -> ec.EllipticCurvePublicKey:
    """Load a PEM public key and check it is EC on a NIST curve (P-256, P-384, P-521).

    Raises
    ------
    ConfigError
        If the PEM is too large, does not parse, or holds another kind of key.
    """
    raw = data.encode("ascii", errors="replace") if isinstance(data, str) else data
    if not isinstance(raw, bytes) or not 0 < len(raw) <= _MAX_PEM_BYTES:
        raise ConfigError(f"a public key PEM has 1..{_MAX_PEM_BYTES} bytes")
    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError("the public key is not a PEM SubjectPublicKeyInfo") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, NIST_CURVES):
        raise ConfigError("the public key is not an EC key on a NIST curve (P-256/384/521)")
    return key


@dataclass(frozen=True, slots=True, kw_only=True)
class RevokedDevice:
    """One entry of a revocation list."""

    device_id: str
    revoked_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class RevocationList:
    """A verified revocation list: its order number, issue time and revoked devices."""

    sequence: int
    issued_at: datetime
    revoked: tuple[RevokedDevice, ...]

    @property
    def device_ids(self) -> frozenset[str]:
        """The ids of every revoked device."""
        return frozenset(entry.device_id for entry in self.revoked)


def _iso(moment: datetime) -> str:
    return _check_now(moment).isoformat(timespec="microseconds")


def build_revocation_list(
    authority: EnrolmentAuthority,
    revoked: Iterable[RevokedDevice],
    *,
    sequence: int,
    now: datetime,
) -> bytes:
    """Sign the list of ``revoked`` devices with the enrolment authority's key.

    Parameters
    ----------
    authority
        The secure-aggregation enrolment authority (the key devices pin).
    revoked
        Every revoked device; ids must be unique.
    sequence
        The list's order number (>= 0); see the module notes.
    now
        The issue time (timezone-aware).

    Returns
    -------
    bytes
        The signed envelope described in the module notes.

    Raises
    ------
    ConfigError
        If the sequence is negative, an id repeats or is empty, or a time is naive.
    """
    if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
        raise ConfigError(f"sequence must be a non-negative integer, got {sequence!r}")
    entries = sorted(revoked, key=lambda entry: entry.device_id)
    ids = [entry.device_id for entry in entries]
    if len(set(ids)) != len(ids):
        raise ConfigError("a device appears twice in the revocation list")
    if not all(isinstance(device_id, str) and device_id for device_id in ids):
        raise ConfigError("a revoked device id is empty")
    body = json.dumps(
        {
            "format": REVOCATION_LIST_FORMAT,
            "issued_at": _iso(now),
            "revoked": [
                {"device_id": entry.device_id, "revoked_at": _iso(entry.revoked_at)}
                for entry in entries
            ],
            "sequence": sequence,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    signature = sign(authority.signing_seed, REVOCATION_LIST_LABEL + body.encode("ascii"))
    envelope = {"body": body, "signature": signature.hex()}
    return json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode("ascii")


def _parse_time(value: object) -> datetime:
    if not isinstance(value, str):
        raise CryptoError
    moment = datetime.fromisoformat(value)  # ValueError is turned opaque by the caller
    if moment.tzinfo is None:
        raise CryptoError
    return moment


def _parse_body(body: str) -> RevocationList:
    content = json.loads(body)
    if not isinstance(content, dict) or set(content) != {
        "format",
        "issued_at",
        "revoked",
        "sequence",
    }:
        raise CryptoError
    sequence = content["sequence"]
    if content["format"] != REVOCATION_LIST_FORMAT or type(sequence) is not int or sequence < 0:
        raise CryptoError
    if not isinstance(content["revoked"], list):
        raise CryptoError
    entries: list[RevokedDevice] = []
    for item in content["revoked"]:
        if not isinstance(item, dict) or set(item) != {"device_id", "revoked_at"}:
            raise CryptoError
        if not isinstance(item["device_id"], str) or not item["device_id"]:
            raise CryptoError
        entries.append(
            RevokedDevice(device_id=item["device_id"], revoked_at=_parse_time(item["revoked_at"]))
        )
    if len({entry.device_id for entry in entries}) != len(entries):
        raise CryptoError
    return RevocationList(
        sequence=sequence, issued_at=_parse_time(content["issued_at"]), revoked=tuple(entries)
    )


def verify_revocation_list(
    data: bytes,
    authority_public_key: bytes,
    *,
    now: datetime,
    min_sequence: int = 0,
    max_age: timedelta | None = None,
) -> RevocationList:
    """Check a revocation list's signature and freshness; return what it revokes.

    Parameters
    ----------
    data
        The envelope from :func:`build_revocation_list`.
    authority_public_key
        The enrolment authority's raw Ed25519 key, as pinned in the device policy.
    now
        The verifier's time (timezone-aware).
    min_sequence
        The largest sequence the verifier has accepted before: an older list is
        refused (a replay could otherwise un-revoke a device).
    max_age
        When given, a list issued longer ago than this is refused.

    Returns
    -------
    RevocationList
        The verified list; ``device_ids`` is the revoked set.

    Raises
    ------
    CryptoError
        Opaquely, if the signature, format, sequence or issue time is not acceptable.
    ConfigError
        If ``now`` is naive (a caller bug, not an attack).
    """
    moment = _check_now(now)
    try:
        if not isinstance(data, bytes) or len(data) > _MAX_LIST_BYTES:
            raise CryptoError
        envelope = json.loads(data)
        if not isinstance(envelope, dict) or set(envelope) != {"body", "signature"}:
            raise CryptoError
        body, signature = envelope["body"], envelope["signature"]
        if not isinstance(body, str) or not isinstance(signature, str):
            raise CryptoError
        verify_signature(
            authority_public_key,
            bytes.fromhex(signature),
            REVOCATION_LIST_LABEL + body.encode("utf-8"),
        )
        parsed = _parse_body(body)
    except (ValueError, TypeError, UnicodeError, RecursionError) as exc:
        raise CryptoError from exc
    if parsed.sequence < min_sequence or parsed.issued_at > moment + _CLOCK_SKEW:
        raise CryptoError
    if max_age is not None and parsed.issued_at < moment - max_age:
        raise CryptoError
    return parsed
