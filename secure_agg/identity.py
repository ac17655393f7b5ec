"""Enrolment identities: long-term Ed25519 keys certified by an enrolment authority.

In the active-adversary variant every key advertisement is signed with the
client's identity key, and a client accepts a neighbour's advertisement only
with a certificate from the enrolment authority it trusts. The coordinator
relays certificates but cannot mint them, so it cannot impersonate clients or
inject Sybils (Bonawitz et al. 2017 assume such a PKI for their active model).

Notes
-----
Two certificate versions exist, told apart by the domain label their signature
covers, so neither can be passed off as the other:

- version 1 (``expires_at`` is ``None``): ``label/identity | len | id | key``,
  valid until the device is revoked;
- version 2: ``label/identity-v2 NUL | expires_at | len | id | key``, valid
  before ``expires_at`` (Unix seconds) on the *verifier's* clock.

Stripping the expiry from a version-2 certificate (to present it as version 1)
changes the signed message, so the signature no longer verifies. A device's
policy may refuse version-1 certificates altogether
(:attr:`secure_agg.policy.ProtocolPolicy.require_certificate_expiry`).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from fedge.errors import ConfigError
from secure_agg.crypto import (
    KEY_BYTES,
    PROTOCOL_LABEL,
    sign,
    signing_key_from_seed,
    verify_signature,
)
from secure_agg.errors import CryptoError
from secure_agg.randomness import RandomSource

__all__ = [
    "MAX_ENROLMENT_ID",
    "MAX_EXPIRES_AT",
    "EnrolmentAuthority",
    "IdentityCertificate",
    "NodeIdentity",
]

MAX_ENROLMENT_ID = 128
MAX_EXPIRES_AT = (1 << 63) - 1
_MAX_ENROLMENT_BYTES = 4 * MAX_ENROLMENT_ID
# A version-1 message continues "/identity" with a 2-byte length <= 512; "-v" would
# be 11638, so no version-1 message shares a prefix with a version-2 one.
_LABEL_V1 = PROTOCOL_LABEL + b"/identity"
_LABEL_V2 = PROTOCOL_LABEL + b"/identity-v2\x00"


def _certificate_message(enrolment_id: str, public_key: bytes, expires_at: int | None) -> bytes:
    encoded = enrolment_id.encode("utf-8")
    body = struct.pack(">H", len(encoded)) + encoded + public_key
    if expires_at is None:
        return _LABEL_V1 + body
    return _LABEL_V2 + struct.pack(">Q", expires_at) + body


def _valid_expiry(expires_at: object) -> bool:
    return expires_at is None or (type(expires_at) is int and 0 < expires_at <= MAX_EXPIRES_AT)


@dataclass(frozen=True, slots=True)
class IdentityCertificate:
    """The authority's signature binding an enrolment id to an identity public key.

    ``expires_at`` (Unix seconds) is ``None`` for a version-1 certificate, which
    does not expire; see the module notes.
    """

    enrolment_id: str
    public_key: bytes
    signature: bytes
    expires_at: int | None = None

    def to_json(self) -> dict[str, str | int]:
        """Return the certificate as JSON values (bytes as hex; no expiry key for version 1)."""
        document: dict[str, str | int] = {
            "enrolment_id": self.enrolment_id,
            "public_key": self.public_key.hex(),
            "signature": self.signature.hex(),
        }
        if self.expires_at is not None:
            document["expires_at"] = self.expires_at
        return document

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> IdentityCertificate:
        """Return the certificate of a JSON document; its signature is not checked here.

        Raises
        ------
        KeyError, TypeError, ValueError
            If a field is missing or malformed.
        """
        expires = raw.get("expires_at")
        return cls(
            enrolment_id=str(raw["enrolment_id"]),
            public_key=bytes.fromhex(str(raw["public_key"])),
            signature=bytes.fromhex(str(raw["signature"])),
            expires_at=None if expires is None else int(str(expires)),
        )

    def verify(self, authority_public_key: bytes) -> None:
        """Raise the opaque :class:`CryptoError` unless the authority signed this certificate.

        A certificate whose fields are out of range (an enrolment id longer than
        any the authority issues, a key of the wrong size, an expiry outside
        1..``MAX_EXPIRES_AT``) fails the same way, before any length is packed
        into the signed message. Expiry is not checked here: see
        :meth:`verify_at_time`.
        """
        encoded = self.enrolment_id.encode("utf-8", errors="replace")
        if (
            not 0 < len(self.enrolment_id) <= MAX_ENROLMENT_ID
            or len(encoded) > _MAX_ENROLMENT_BYTES
            or len(self.public_key) != KEY_BYTES
            or not _valid_expiry(self.expires_at)
        ):
            raise CryptoError
        verify_signature(
            authority_public_key,
            self.signature,
            _certificate_message(self.enrolment_id, self.public_key, self.expires_at),
        )

    def verify_at_time(self, authority_public_key: bytes, now: int | None) -> None:
        """Raise the opaque :class:`CryptoError` unless the certificate is signed and unexpired.

        Parameters
        ----------
        authority_public_key
            The enrolment authority's raw Ed25519 key, as pinned in the verifier's policy.
        now
            The verifier's own clock in Unix seconds; ``None`` when it has none,
            and then a certificate that expires is refused (it cannot be checked).

        Raises
        ------
        CryptoError
            If the signature does not verify, or the certificate expires at or
            before ``now``.
        ConfigError
            If ``now`` is not an integer (a caller bug, not an attack).

        Notes
        -----
        ``now`` must be the device's own clock, never a time a server sent: a
        server could otherwise revive an expired neighbour by lying about the time.
        """
        if now is not None and type(now) is not int:
            raise ConfigError(f"now must be an integer of Unix seconds, got {now!r}")
        self.verify(authority_public_key)
        if self.expires_at is not None and (now is None or now >= self.expires_at):
            raise CryptoError


@dataclass(frozen=True, slots=True)
class EnrolmentAuthority:
    """Holds the key that certifies device identities (kept apart from the coordinator)."""

    signing_seed: bytes

    @classmethod
    def generate(cls, rng: RandomSource) -> EnrolmentAuthority:
        """Create an authority with a fresh key."""
        return cls(signing_seed=rng.random_bytes(KEY_BYTES))

    @property
    def public_key(self) -> bytes:
        """The key every client trusts to verify certificates."""
        return signing_key_from_seed(self.signing_seed).public_key().public_bytes_raw()

    def enrol(
        self, enrolment_id: str, rng: RandomSource, *, expires_at: int | None = None
    ) -> NodeIdentity:
        """Create and certify a new device identity (simulations: the authority sees the key).

        ``expires_at`` is passed to :meth:`certify`.
        """
        seed = rng.random_bytes(KEY_BYTES)
        public = signing_key_from_seed(seed).public_key().public_bytes_raw()
        certificate = self.certify(enrolment_id, public, expires_at=expires_at)
        return NodeIdentity(signing_seed=seed, certificate=certificate)

    def certify(
        self, enrolment_id: str, public_key: bytes, *, expires_at: int | None = None
    ) -> IdentityCertificate:
        """Certify an identity key the device generated itself.

        Parameters
        ----------
        enrolment_id
            The device's id, 1..``MAX_ENROLMENT_ID`` characters.
        public_key
            The device's raw 32-byte Ed25519 public key.
        expires_at
            When the certificate stops being valid, in Unix seconds
            (1..``MAX_EXPIRES_AT``); ``None`` issues a version-1 certificate that
            never expires (valid until revoked).

        Returns
        -------
        IdentityCertificate
            The authority's signature binding ``enrolment_id`` to ``public_key``
            (and to ``expires_at``).

        Raises
        ------
        ConfigError
            If the id is empty or too long, the key does not have 32 bytes, or
            ``expires_at`` is not an integer in range.

        Notes
        -----
        In a deployment the device makes its own key pair and sends only the
        public half, so the authority (and the coordinator next to it) never
        holds a private identity key it could impersonate a device with.
        """
        if not 0 < len(enrolment_id) <= MAX_ENROLMENT_ID:
            raise ConfigError(f"enrolment ids have 1..{MAX_ENROLMENT_ID} characters")
        if not isinstance(public_key, bytes) or len(public_key) != KEY_BYTES:
            raise ConfigError(f"an identity public key has exactly {KEY_BYTES} bytes")
        if not _valid_expiry(expires_at):
            raise ConfigError(
                f"expires_at must be an integer of Unix seconds in 1..{MAX_EXPIRES_AT}, "
                f"got {expires_at!r}"
            )
        message = _certificate_message(enrolment_id, public_key, expires_at)
        return IdentityCertificate(
            enrolment_id=enrolment_id,
            public_key=public_key,
            signature=sign(self.signing_seed, message),
            expires_at=expires_at,
        )


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """A device's identity key (private) and its certificate (public)."""

    signing_seed: bytes
    certificate: IdentityCertificate

    def sign(self, message: bytes) -> bytes:
        """Sign ``message`` with the identity key."""
        return sign(self.signing_seed, message)
