"""Typed messages of one SecAgg+ round, one dataclass per stage and direction.

Stages: advertise keys -> share keys -> masked input -> [consistency check] ->
unmask. With keys announced in advance (:class:`PreKey`, sent with a device's
last reply of a round, or on request), the first two merge into one: the server
sends the setup with every participant's pre-key (:class:`PrekeyedSetup`) and
each client answers with its advertisement and its sealed shares at once
(:class:`PrekeyedShares`); its neighbours' advertisements then travel with the
masked-input request. Adapters in ``fl_client``/``fl_server`` convert them to Flower records;
the state machines validate them once, on arrival.

The round setup carries no trust anchor: the threat model is there only so a
device can refuse a round that runs another one, and the enrolment authority's
key comes from the device's own policy (:mod:`secure_agg.policy`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    "GraphSetup",
    "KeyAdvertisement",
    "MaskedInput",
    "MaskedInputReport",
    "MaskedInputRequest",
    "PreKey",
    "PreKeyRequest",
    "PrekeyedSetup",
    "PrekeyedShares",
    "RoundSetup",
    "ShareKeysRequest",
    "UnmaskRequest",
    "UnmaskResponse",
    "advert_message",
    "prekey_message",
    "setup_digest",
    "survivors_message",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundSetup:
    """Server -> client: the round's parameters, the same for every participant but ``node_id``.

    Parameters
    ----------
    round_id
        The random id every key, share and signature of the round is bound to.
    node_id
        The recipient.
    participants
        Every client of the round, sorted; each draws its ``degree`` holders from them.
    degree, threshold
        k, the holders each client shares its secrets with, and t, the shares
        that reconstruct one.
    encoding, vector_length
        The ring and the length of every masked vector.
    threat_model
        The model the server runs (a device refuses one its policy does not name).
    """

    round_id: bytes
    node_id: int
    participants: tuple[int, ...]
    degree: int
    threshold: int
    encoding: EncodingConfig
    vector_length: int
    threat_model: ThreatModel


def setup_digest(setup: RoundSetup) -> bytes:
    """Return the SHA-256 of everything in a setup but the recipient.

    Every advertisement carries (and, in the active model, signs) it, so a
    server that shows different parameters or participants to different
    clients is caught by any honest client that sees another's advertisement.
    """
    encoding = setup.encoding
    return hashlib.sha256(
        PROTOCOL_LABEL
        + b"/setup"
        + struct.pack(">B", len(setup.round_id))
        + setup.round_id
        + struct.pack(f">I{len(setup.participants)}Q", len(setup.participants), *setup.participants)
        + struct.pack(
            ">IIdBIIQ",
            setup.degree,
            setup.threshold,
            encoding.clip_range,
            encoding.ring_bits,
            encoding.max_clients,
            encoding.weight_cap,
            setup.vector_length,
        )
        + setup.threat_model.value.encode()
    ).digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyAdvertisement:
    """Client -> server (relayed to neighbours): keys, commitment, chosen holders, setup digest.

    ``holders`` are the k clients this client drew to hold its shares; the
    client and every holder mask their updates with each other.
    """

    node_id: int
    enc_public: bytes
    mask_public: bytes
    self_mask_commitment: bytes
    holders: tuple[int, ...]
    setup_digest: bytes
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
        + advert.setup_digest
        + struct.pack(f">I{len(advert.holders)}Q", len(advert.holders), *advert.holders)
    )


def survivors_message(round_id: bytes, survivors: Sequence[int]) -> bytes:
    """Return the bytes a consistency signature covers: the round and the sorted survivor set."""
    ordered = sorted(survivors)
    return PROTOCOL_LABEL + b"/survivors" + round_id + struct.pack(f">{len(ordered)}Q", *ordered)


@dataclass(frozen=True, slots=True, kw_only=True)
class PreKey:
    """Client -> server: the public keys of this device's next participation, announced early.

    One fresh pair of X25519 keys (share encryption and masking), used in exactly one
    round and deleted on the device once used or replaced. In the active model it is
    signed by the device's enrolment identity, so the server cannot substitute keys
    of its own (it would then open the shares other clients seal to this device).
    It is bound to the node id but not to a round: the round binding comes from
    every key derived from it (round id in the key derivation and the sealed data).
    """

    node_id: int
    enc_public: bytes
    mask_public: bytes
    certificate: IdentityCertificate | None = None
    signature: bytes | None = None


def prekey_message(prekey: PreKey) -> bytes:
    """Return the bytes a pre-key's signature covers."""
    return (
        PROTOCOL_LABEL
        + b"/prekey"
        + struct.pack(">Q", prekey.node_id)
        + prekey.enc_public
        + prekey.mask_public
    )


@dataclass(frozen=True, slots=True)
class PreKeyRequest:
    """Server -> client: announce a fresh pre-key (the server holds none it can use)."""

    node_id: int


@dataclass(frozen=True, slots=True)
class PrekeyedSetup:
    """Server -> client: the round setup and the pre-key of every participant, by node id.

    The client draws its holders, checks their pre-keys against its policy and
    seals its shares to them at once: one round trip instead of two.
    """

    setup: RoundSetup
    prekeys: tuple[PreKey, ...]


@dataclass(frozen=True, slots=True)
class GraphSetup:
    """Server -> client (semi-honest model): a round keyed in advance whose graph the server drew.

    ``holders`` are the clients this one seals its shares to, ``drawn_by`` those
    that seal theirs to it: knowing both, the client masks with every neighbour
    in the same reply as its advertisement and shares (the masked-input stage
    rides on the first trip), and receives its bundles with the unmask request.
    """

    setup: RoundSetup
    prekeys: tuple[PreKey, ...]
    holders: tuple[int, ...]
    drawn_by: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ShareKeysRequest:
    """Server -> client: the advertisements of the client's neighbours.

    Its neighbours are its own holders and the clients that drew it as one.
    """

    adverts: tuple[KeyAdvertisement, ...]


@dataclass(frozen=True, slots=True)
class EncryptedShares:
    """Client -> server: one sealed share bundle per holder that advertised, keyed by recipient."""

    node_id: int
    ciphertexts: Mapping[int, bytes]


@dataclass(frozen=True, slots=True)
class MaskedInputRequest:
    """Server -> client: its neighbours that shared their keys, and the bundles addressed to it.

    ``partners`` are the neighbours the client masks with; ``ciphertexts`` holds
    one bundle from each partner that drew the client as a holder. In a round
    keyed in advance, ``adverts`` holds its neighbours' advertisements (the
    classic round relays them in the share-keys request instead).
    """

    partners: tuple[int, ...]
    ciphertexts: Mapping[int, bytes]
    adverts: tuple[KeyAdvertisement, ...] = ()


@dataclass(frozen=True, slots=True)
class PrekeyedShares:
    """Client -> server: its advertisement (keys = its pre-key) and one sealed bundle per holder."""

    advert: KeyAdvertisement
    shares: EncryptedShares


@dataclass(frozen=True, slots=True)
class MaskedInputReport:
    """Client -> server, beside the masked vector: the partners whose bundle it could not open.

    Each is that sender's failure: the server drops it from the round, and the
    client has not masked with it.
    """

    node_id: int
    rejected: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class MaskedInput:
    """Client -> server: the masked, encoded update and the partners it rejected."""

    node_id: int
    vector: npt.NDArray[np.unsignedinteger[Any]]
    rejected: tuple[int, ...] = ()


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
    """Server -> client: the survivor set and, in the active model, the signatures on it.

    In a round on a server-drawn graph (:class:`GraphSetup`), ``ciphertexts``
    holds the bundles of the clients that drew this one (sealed in the first
    trip, delivered only now).
    """

    survivors: tuple[int, ...]
    signatures: Mapping[int, bytes]
    ciphertexts: Mapping[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UnmaskResponse:
    """Client -> server: self-mask shares of survivors, masking-key shares of the dropped.

    ``pairwise_seeds`` holds the seed of the mask this client shares with each
    partner it masked with that is not in the survivor set: with them the server
    removes those masks even when the dropped partner's key cannot be rebuilt
    (its bundles were bad). They reveal nothing the dropped partner's key would
    not: the masks of a client outside the sum. On a server-drawn graph,
    ``pair_seed_shares`` holds, for each surviving sender whose bundle this
    client holds, its shares of that sender's seeds with partners outside the
    sum (what the sender reveals itself, recoverable if it falls silent now).
    """

    node_id: int
    self_mask_shares: Mapping[int, npt.NDArray[np.uint32]]
    mask_key_shares: Mapping[int, npt.NDArray[np.uint32]]
    pairwise_seeds: Mapping[int, bytes] = field(default_factory=dict)
    pair_seed_shares: Mapping[int, Mapping[int, npt.NDArray[np.uint32]]] = field(
        default_factory=dict
    )
