"""Enrolment identities: long-term Ed25519 keys certified by an enrolment authority.

In the active-adversary variant every key advertisement is signed with the
client's identity key, and a client accepts a neighbour's advertisement only
with a certificate from the enrolment authority it trusts. The coordinator
relays certificates but cannot mint them, so it cannot impersonate clients or
inject Sybils (Bonawitz et al. 2017 assume such a PKI for their active model).
"""

from __future__ import annotations

import struct
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

__all__ = ["MAX_ENROLMENT_ID", "EnrolmentAuthority", "IdentityCertificate", "NodeIdentity"]

MAX_ENROLMENT_ID = 128
_MAX_ENROLMENT_BYTES = 4 * MAX_ENROLMENT_ID


def _certificate_message(enrolment_id: str, public_key: bytes) -> bytes:
    encoded = enrolment_id.encode("utf-8")
    return PROTOCOL_LABEL + b"/identity" + struct.pack(">H", len(encoded)) + encoded + public_key


@dataclass(frozen=True, slots=True)
class IdentityCertificate:
    """The authority's signature binding an enrolment id to an identity public key."""

    enrolment_id: str
    public_key: bytes
    signature: bytes

    def verify(self, authority_public_key: bytes) -> None:
        """Raise the opaque :class:`CryptoError` unless the authority signed this certificate.

        A certificate whose fields are out of range (an enrolment id longer than
        any the authority issues, a key of the wrong size) fails the same way,
        before any length is packed into the signed message.
        """
        encoded = self.enrolment_id.encode("utf-8", errors="replace")
        if (
            not 0 < len(self.enrolment_id) <= MAX_ENROLMENT_ID
            or len(encoded) > _MAX_ENROLMENT_BYTES
            or len(self.public_key) != KEY_BYTES
        ):
            raise CryptoError
        verify_signature(
            authority_public_key,
            self.signature,
            _certificate_message(self.enrolment_id, self.public_key),
        )


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

    def enrol(self, enrolment_id: str, rng: RandomSource) -> NodeIdentity:
        """Create and certify a new device identity (simulations: the authority sees the key)."""
        seed = rng.random_bytes(KEY_BYTES)
        public = signing_key_from_seed(seed).public_key().public_bytes_raw()
        return NodeIdentity(signing_seed=seed, certificate=self.certify(enrolment_id, public))

    def certify(self, enrolment_id: str, public_key: bytes) -> IdentityCertificate:
        """Certify an identity key the device generated itself.

        Parameters
        ----------
        enrolment_id
            The device's id, 1..``MAX_ENROLMENT_ID`` characters.
        public_key
            The device's raw 32-byte Ed25519 public key.

        Returns
        -------
        IdentityCertificate
            The authority's signature binding ``enrolment_id`` to ``public_key``.

        Raises
        ------
        ConfigError
            If the id is empty or too long, or the key does not have 32 bytes.

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
        signature = sign(self.signing_seed, _certificate_message(enrolment_id, public_key))
        return IdentityCertificate(
            enrolment_id=enrolment_id, public_key=public_key, signature=signature
        )


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """A device's identity key (private) and its certificate (public)."""

    signing_seed: bytes
    certificate: IdentityCertificate

    def sign(self, message: bytes) -> bytes:
        """Sign ``message`` with the identity key."""
        return sign(self.signing_seed, message)
