"""What client and server must agree on to build and remove masks: seeds, signs, commitments.

Kept in one place so the two sides cannot drift apart: a client adds the
pairwise mask it shares with a higher-numbered partner and subtracts the one it
shares with a lower-numbered partner, so the masks of two survivors cancel in
the sum, and the server undoes exactly what a dropped client's partners did.
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from secure_agg.crypto import PROTOCOL_LABEL, KeyPurpose, derive_pair_key

__all__ = ["adds_pairwise_mask", "pairwise_mask_seed", "self_mask_commitment"]


def pairwise_mask_seed(
    mask_private: bytes | X25519PrivateKey,
    peer_mask_public: bytes,
    *,
    round_id: bytes,
    node: int,
    peer: int,
) -> bytes:
    """Return the seed of the mask ``node`` and ``peer`` share (the same from either end)."""
    return derive_pair_key(
        mask_private,
        peer_mask_public,
        purpose=KeyPurpose.PAIRWISE_MASK,
        round_id=round_id,
        node_a=node,
        node_b=peer,
    )


def adds_pairwise_mask(node: int, peer: int) -> bool:
    """Return True when ``node`` adds (rather than subtracts) the mask it shares with ``peer``."""
    return node < peer


def self_mask_commitment(round_id: bytes, node_id: int, seed: bytes) -> bytes:
    """Return the SHA-256 commitment to a self-mask seed that the server checks after unmasking."""
    return hashlib.sha256(
        PROTOCOL_LABEL + b"/self-mask" + round_id + struct.pack(">Q", node_id) + seed
    ).digest()
