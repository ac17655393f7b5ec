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
The revocation list (its format, the sequence rule against replays, and the
opaque failures) lives in :mod:`secure_agg.revocation`, so that devices can
verify it without importing the cloud side; this module re-exports its names.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge.errors import ConfigError
from secure_agg.revocation import (
    REVOCATION_LIST_FORMAT,
    REVOCATION_LIST_LABEL,
    RevocationList,
    RevokedDevice,
    build_revocation_list,
    verify_revocation_list,
)

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

_MAX_SANS = 64
_MAX_PEM_BYTES = 16 * 1024
_MAX_COMMON_NAME = 64
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

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
