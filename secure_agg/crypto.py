"""Key agreement (X25519 + HKDF), share encryption (ChaCha20-Poly1305) and signatures (Ed25519).

Every derived key is bound to the protocol version, its purpose, the round and
both node ids, so a key (or a ciphertext) from one round, pair or purpose is
useless in any other.

Notes
-----
Each client holds two X25519 key pairs per round, as in Bonawitz et al. (CCS
2017): ``enc`` keys encrypt the shares sent through the server, ``mask`` keys
seed the pairwise masks. Only the ``mask`` private key is secret-shared (so the
server can cancel a dropped client's masks); the ``enc`` private key never
leaves the client. All decryption and verification failures raise the same
opaque :class:`CryptoError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secure_agg.errors import CryptoError
from secure_agg.randomness import RandomSource

__all__ = [
    "KEY_BYTES",
    "PROTOCOL_LABEL",
    "AgreementKeyPair",
    "KeyPurpose",
    "derive_pair_key",
    "open_sealed",
    "public_key_of",
    "seal",
    "sign",
    "signing_key_from_seed",
    "verify_signature",
]

PROTOCOL_LABEL = b"fedge/secagg+/v1"
KEY_BYTES = 32
_NONCE_BYTES = 12


class KeyPurpose(Enum):
    """What a derived pairwise key is for; part of the HKDF info."""

    SHARE_ENCRYPTION = b"share-encryption"
    PAIRWISE_MASK = b"pairwise-mask"


@dataclass(frozen=True, slots=True)
class AgreementKeyPair:
    """An X25519 key pair as raw 32-byte strings."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls, rng: RandomSource) -> AgreementKeyPair:
        """Draw a key pair from ``rng``."""
        private = X25519PrivateKey.from_private_bytes(rng.random_bytes(KEY_BYTES))
        return cls(private=private.private_bytes_raw(), public=public_key_of(private))


def public_key_of(private: X25519PrivateKey | bytes) -> bytes:
    """Return the raw public key of an X25519 private key (object or 32 raw bytes)."""
    key = private if isinstance(private, X25519PrivateKey) else _x25519_private(private)
    return key.public_key().public_bytes_raw()


def _x25519_private(raw: bytes) -> X25519PrivateKey:
    if len(raw) != KEY_BYTES:
        raise CryptoError
    return X25519PrivateKey.from_private_bytes(raw)


def derive_pair_key(
    private: bytes | X25519PrivateKey,
    peer_public: bytes,
    *,
    purpose: KeyPurpose,
    round_id: bytes,
    node_a: int,
    node_b: int,
) -> bytes:
    """Derive the 32-byte key two nodes share for ``purpose`` in round ``round_id``.

    Symmetric in the two nodes: both ends derive the same key. ``private`` may
    be a loaded key object, which saves re-loading it for every peer.

    Raises
    ------
    CryptoError
        If a key is malformed or the agreement yields the all-zero secret
        (a small-order public key).
    """
    if len(peer_public) != KEY_BYTES:
        raise CryptoError
    try:
        key = private if isinstance(private, X25519PrivateKey) else _x25519_private(private)
        secret = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise CryptoError from exc
    low, high = sorted((node_a, node_b))
    info = (
        PROTOCOL_LABEL
        + b"/"
        + purpose.value
        + struct.pack(">B", len(round_id))
        + round_id
        + struct.pack(">QQ", low, high)
    )
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def seal(key: bytes, plaintext: bytes, associated_data: bytes, rng: RandomSource) -> bytes:
    """Encrypt and authenticate ``plaintext`` bound to ``associated_data``; nonce prepended."""
    nonce = rng.random_bytes(_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    """Decrypt what :func:`seal` produced. Raises the opaque :class:`CryptoError` on any failure."""
    if len(sealed) < _NONCE_BYTES + 16:
        raise CryptoError
    try:
        return ChaCha20Poly1305(key).decrypt(
            sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], associated_data
        )
    except (InvalidTag, ValueError) as exc:
        raise CryptoError from exc


def signing_key_from_seed(seed: bytes) -> Ed25519PrivateKey:
    """Return the Ed25519 key whose 32-byte private seed is ``seed``."""
    if len(seed) != KEY_BYTES:
        raise CryptoError
    return Ed25519PrivateKey.from_private_bytes(seed)


def sign(private_seed: bytes, message: bytes) -> bytes:
    """Sign ``message`` with the Ed25519 key of ``private_seed``; 64-byte signature."""
    return signing_key_from_seed(private_seed).sign(message)


def verify_signature(public: bytes, signature: bytes, message: bytes) -> None:
    """Check an Ed25519 signature. Raises the opaque :class:`CryptoError` if it does not verify."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError) as exc:
        raise CryptoError from exc
