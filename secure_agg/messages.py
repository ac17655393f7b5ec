"""Typed messages of one SecAgg+ round, one dataclass per stage and direction.

Stages: advertise keys -> share keys -> masked input -> [consistency check] ->
unmask. Adapters in ``fl_client``/``fl_server`` convert them to Flower records;
the state machines validate them once, on arrival.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from secure_agg.crypto import PROTOCOL_LABEL
from secure_agg.encoding import EncodingConfig
from secure_agg.identity import IdentityCertificate
from secure_agg.params import ThreatModel

__all__ = [
    "ConsistencyRequest",
    "ConsistencySignature",
    "EncryptedShares",
    "KeyAdvertisement",
    "MaskedInput",
    "MaskedInputRequest",
    "RoundSetup",
    "ShareKeysRequest",
    "UnmaskRequest",
    "UnmaskResponse",
    "advert_message",
    "survivors_message",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundSetup:
    """Server -> client: the round's parameters and this client's neighbours."""

    round_id: bytes
    node_id: int
    neighbours: tuple[int, ...]
    threshold: int
    encoding: EncodingConfig
    vector_length: int
    threat_model: ThreatModel
    authority_public_key: bytes | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyAdvertisement:
    """Client -> server (relayed to neighbours): public keys and the self-mask commitment."""

    node_id: int
    enc_public: bytes
    mask_public: bytes
    self_mask_commitment: bytes
    certificate: IdentityCertificate | None = None
    signature: bytes | None = None


def advert_message(round_id: bytes, advert: KeyAdvertisement) -> bytes:
    """Return the bytes an advertisement's signature covers."""
    return (
        PROTOCOL_LABEL
        + b"/advert"
        + round_id
        + struct.pack(">Q", advert.node_id)
        + advert.enc_public
        + advert.mask_public
        + advert.self_mask_commitment
    )


def survivors_message(round_id: bytes, survivors: Sequence[int]) -> bytes:
    """Return the bytes a consistency signature covers: the round and the sorted survivor set."""
    ordered = sorted(survivors)
    return PROTOCOL_LABEL + b"/survivors" + round_id + struct.pack(f">{len(ordered)}Q", *ordered)


@dataclass(frozen=True, slots=True)
class ShareKeysRequest:
    """Server -> client: the advertisements of the client's neighbours that advertised."""

    adverts: tuple[KeyAdvertisement, ...]


@dataclass(frozen=True, slots=True)
class EncryptedShares:
    """Client -> server: one sealed share bundle per neighbour, keyed by recipient."""

    node_id: int
    ciphertexts: Mapping[int, bytes]


@dataclass(frozen=True, slots=True)
class MaskedInputRequest:
    """Server -> client: the sealed bundles addressed to it, keyed by sender."""

    ciphertexts: Mapping[int, bytes]


@dataclass(frozen=True, slots=True)
class MaskedInput:
    """Client -> server: the masked, encoded update."""

    node_id: int
    vector: npt.NDArray[np.unsignedinteger[Any]]


@dataclass(frozen=True, slots=True)
class ConsistencyRequest:
    """Server -> client (active model): the set of clients whose masked input arrived."""

    survivors: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ConsistencySignature:
    """Client -> server (active model): a signature over the survivor set it was shown."""

    node_id: int
    signature: bytes


@dataclass(frozen=True, slots=True)
class UnmaskRequest:
    """Server -> client: the survivor set and, in the active model, the signatures on it."""

    survivors: tuple[int, ...]
    signatures: Mapping[int, bytes]


@dataclass(frozen=True, slots=True)
class UnmaskResponse:
    """Client -> server: self-mask shares of survivors, masking-key shares of the dropped."""

    node_id: int
    self_mask_shares: Mapping[int, npt.NDArray[np.uint32]]
    mask_key_shares: Mapping[int, npt.NDArray[np.uint32]]
