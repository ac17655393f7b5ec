"""Device-authenticated requests: a device signs each request with its enrolment identity.

The header a device sends (``Authorization``)::

    Fedge-Device id=<b64 enrolment id>, key=<b64 public key>, cert=<b64 authority
    signature>[, exp=<certificate expiry, unix seconds>], ts=<unix seconds>, sig=<b64 signature>

``sig`` is the device's Ed25519 signature over
``fedge/request/v1``, the method, the target and ``ts``, joined by newlines; the server checks the
authority's certificate on (id, key[, exp]) — an expiring certificate only
until its expiry on the server's clock — the signature, and that ``ts`` is within
``max_skew_s`` of its clock. TLS protects the channel; the signature says which
enrolled device asks. A captured header can be replayed for the same request
within the skew window, which for idempotent downloads of fleet-wide artefacts
reveals nothing new.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from secure_agg.crypto import verify_signature
from secure_agg.errors import CryptoError
from secure_agg.identity import IdentityCertificate, NodeIdentity

__all__ = ["SCHEME", "AuthenticatedDevice", "authorization_header", "verify_authorization"]

SCHEME = "Fedge-Device"
_LABEL = b"fedge/request/v1"
_FIELD = re.compile(r"^\s*([a-z]+)=([A-Za-z0-9+/=_-]*)\s*$")
_MAX_HEADER = 2048


@dataclass(frozen=True, slots=True)
class AuthenticatedDevice:
    """Who a verified request came from."""

    enrolment_id: str
    public_key: bytes


def _message(method: str, target: str, timestamp: int) -> bytes:
    return b"\n".join((_LABEL, method.upper().encode(), target.encode(), str(timestamp).encode()))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def authorization_header(
    identity: NodeIdentity, *, method: str, target: str, timestamp: int
) -> str:
    """Return the ``Authorization`` value of a request signed by ``identity``."""
    certificate = identity.certificate
    signature = identity.sign(_message(method, target, timestamp))
    expiry = "" if certificate.expires_at is None else f"exp={certificate.expires_at}, "
    return (
        f"{SCHEME} id={_b64(certificate.enrolment_id.encode())}, "
        f"key={_b64(certificate.public_key)}, cert={_b64(certificate.signature)}, "
        f"{expiry}ts={timestamp}, sig={_b64(signature)}"
    )


def verify_authorization(
    header: str | None,
    *,
    method: str,
    target: str,
    authority_public_key: bytes,
    now: float,
    max_skew_s: float = 300.0,
) -> AuthenticatedDevice:
    """Return the device that signed this request.

    Raises
    ------
    CryptoError
        If the header is missing or malformed, the certificate or the signature
        does not verify, or the timestamp is outside the allowed skew (which of
        these is not said).
    """
    if header is None or len(header) > _MAX_HEADER or not header.startswith(SCHEME + " "):
        raise CryptoError()
    fields: dict[str, str] = {}
    for part in header[len(SCHEME) + 1 :].split(","):
        match = _FIELD.match(part)
        if match is None or match.group(1) in fields:
            raise CryptoError()
        fields[match.group(1)] = match.group(2)
    required = {"id", "key", "cert", "ts", "sig"}
    if set(fields) - {"exp"} != required or not fields["ts"].isdigit():
        raise CryptoError()
    if "exp" in fields and not fields["exp"].isdigit():
        raise CryptoError()
    try:
        enrolment_id = base64.b64decode(fields["id"], validate=True).decode("utf-8")
        public_key = base64.b64decode(fields["key"], validate=True)
        cert_signature = base64.b64decode(fields["cert"], validate=True)
        signature = base64.b64decode(fields["sig"], validate=True)
    except (binascii.Error, UnicodeDecodeError):
        raise CryptoError() from None
    timestamp = int(fields["ts"])
    if abs(now - timestamp) > max_skew_s:
        raise CryptoError()
    certificate = IdentityCertificate(
        enrolment_id=enrolment_id,
        public_key=public_key,
        signature=cert_signature,
        expires_at=int(fields["exp"]) if "exp" in fields else None,
    )
    certificate.verify_at_time(authority_public_key, int(now))
    verify_signature(public_key, signature, _message(method, target, timestamp))
    return AuthenticatedDevice(enrolment_id=enrolment_id, public_key=public_key)
