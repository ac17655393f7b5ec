"""The client side of a SecAgg+ round as a state machine (Bell et al. 2020, Bonawitz et al. 2017).

One :class:`ClientSession` per round. Its methods must be called in stage
order; each validates the server's message before acting and raises
:class:`InvalidMessage`, :class:`CryptoError` or :class:`ProtocolAbort` instead
of continuing on bad input.

Notes
-----
Privacy invariants kept here, not trusted to the server: a client reveals, for
each neighbour, either its self-mask share (neighbour survived) or its
masking-key share (neighbour dropped), never both; in the active model it
reveals nothing unless at least ``threshold`` of its neighbours signed the very
survivor set it was shown.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from enum import Enum
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from secure_agg import wire
from secure_agg.crypto import (
    KEY_BYTES,
    PROTOCOL_LABEL,
    AgreementKeyPair,
    KeyPurpose,
    derive_pair_key,
    open_sealed,
    seal,
    verify_signature,
)
from secure_agg.errors import CryptoError, InvalidMessage, ProtocolAbort
from secure_agg.identity import NodeIdentity
from secure_agg.masking import adds_pairwise_mask, pairwise_mask_seed, self_mask_commitment
from secure_agg.messages import (
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    MaskedInputRequest,
    RoundSetup,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskResponse,
    advert_message,
    survivors_message,
)
from secure_agg.params import ThreatModel
from secure_agg.prg import SEED_BYTES, apply_masks
from secure_agg.randomness import RandomSource
from secure_agg.shamir import CHUNKS_PER_SECRET, split
from secure_agg.wire import Reader, Writer

__all__ = ["ClientSession", "ClientStage", "share_associated_data"]

_SHARE_WIDTH = 2 * CHUNKS_PER_SECRET
_BUNDLE = struct.Struct(f">QQ{_SHARE_WIDTH}I")


class ClientStage(Enum):
    """Where a client session stands."""

    CREATED = "created"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    CONFIRMED = "confirmed"
    DONE = "done"


def share_associated_data(round_id: bytes, owner: int, holder: int) -> bytes:
    """Return the associated data that binds a sealed share bundle to its round and pair."""
    return PROTOCOL_LABEL + b"/share" + round_id + struct.pack(">QQ", owner, holder)


class ClientSession:
    """Run one round of SecAgg+ for one client.

    Parameters
    ----------
    setup
        The server's round setup for this client.
    rng
        Source of keys, the self-mask seed, share polynomials and nonces.
    identity
        The enrolment identity (required in the active model).
    """

    def __init__(
        self, setup: RoundSetup, *, rng: RandomSource, identity: NodeIdentity | None = None
    ) -> None:
        if setup.node_id in setup.neighbours or len(set(setup.neighbours)) != len(setup.neighbours):
            raise InvalidMessage("the neighbour list must be distinct and exclude the node itself")
        if not 1 <= setup.threshold <= len(setup.neighbours):
            raise InvalidMessage(
                f"threshold {setup.threshold} outside [1, {len(setup.neighbours)} neighbours]"
            )
        if setup.threat_model is ThreatModel.ACTIVE and (
            identity is None or setup.authority_public_key is None
        ):
            raise InvalidMessage("the active model needs an identity and the authority's key")
        self._setup = setup
        self._rng = rng
        self._identity = identity
        self._stage = ClientStage.CREATED
        self._neighbours = tuple(sorted(setup.neighbours))
        self._enc = AgreementKeyPair.generate(rng)
        self._mask = AgreementKeyPair.generate(rng)
        self._self_seed = rng.random_bytes(SEED_BYTES)
        self._adverts: dict[int, KeyAdvertisement] = {}
        self._share_keys: dict[int, bytes] = {}
        self._enc_loaded: X25519PrivateKey | None = None
        self._partners: tuple[int, ...] = ()
        self._held: dict[int, npt.NDArray[np.uint32]] = {}
        self._survivors: tuple[int, ...] = ()

    @property
    def stage(self) -> ClientStage:
        """The last completed stage."""
        return self._stage

    @property
    def round_id(self) -> bytes:
        """The round this session belongs to."""
        return self._setup.round_id

    @property
    def setup(self) -> RoundSetup:
        """The server's setup for this client."""
        return self._setup

    def export_state(self) -> bytes:
        """Return the session's full state, secrets included, to resume it in another process.

        Notes
        -----
        The bytes hold this round's private keys, self-mask seed and the shares
        held for neighbours: keep them on the device (Flower's ``Context.state``
        stays on the node) and never log or send them.
        """
        return _export(self)

    @classmethod
    def restore(
        cls, state: bytes, *, rng: RandomSource, identity: NodeIdentity | None = None
    ) -> ClientSession:
        """Resume a session from :meth:`export_state`'s bytes.

        Raises
        ------
        InvalidMessage
            If the state is malformed or the active model lacks an identity.
        """
        session = _restore(state, rng, identity)
        if session._setup.threat_model is ThreatModel.ACTIVE and identity is None:
            raise InvalidMessage("the active model needs an identity")
        return session

    def _expect(self, stage: ClientStage) -> None:
        if self._stage is not stage:
            raise InvalidMessage(
                f"out of order: expected after {stage.value}, at {self._stage.value}"
            )

    def advertise(self) -> KeyAdvertisement:
        """Stage 1: publish this round's public keys and the self-mask commitment."""
        self._expect(ClientStage.CREATED)
        advert = KeyAdvertisement(
            node_id=self._setup.node_id,
            enc_public=self._enc.public,
            mask_public=self._mask.public,
            self_mask_commitment=self_mask_commitment(
                self._setup.round_id, self._setup.node_id, self._self_seed
            ),
        )
        if self._identity is not None:
            advert = replace(
                advert,
                certificate=self._identity.certificate,
                signature=self._identity.sign(advert_message(self._setup.round_id, advert)),
            )
        self._stage = ClientStage.ADVERTISED
        return advert

    def _enc_key(self) -> X25519PrivateKey:
        # Loaded once per session (not exported): every neighbour's key uses it.
        if self._enc_loaded is None:
            self._enc_loaded = X25519PrivateKey.from_private_bytes(self._enc.private)
        return self._enc_loaded

    def _check_advert(self, advert: KeyAdvertisement) -> None:
        if advert.node_id not in self._neighbours:
            raise InvalidMessage(f"advertisement from {advert.node_id}, not a neighbour")
        if len(advert.enc_public) != 32 or len(advert.mask_public) != 32:
            raise InvalidMessage(f"advertisement from {advert.node_id} has malformed keys")
        if self._setup.threat_model is ThreatModel.ACTIVE:
            if advert.certificate is None or advert.signature is None:
                raise CryptoError
            assert self._setup.authority_public_key is not None
            advert.certificate.verify(self._setup.authority_public_key)
            verify_signature(
                advert.certificate.public_key,
                advert.signature,
                advert_message(self._setup.round_id, advert),
            )

    def _share_key(self, peer: int, advert: KeyAdvertisement) -> bytes:
        cached = self._share_keys.get(peer)
        if cached is not None:
            return cached
        key = derive_pair_key(
            self._enc_key(),
            advert.enc_public,
            purpose=KeyPurpose.SHARE_ENCRYPTION,
            round_id=self._setup.round_id,
            node_a=self._setup.node_id,
            node_b=peer,
        )
        self._share_keys[peer] = key
        return key

    def share_keys(self, request: ShareKeysRequest) -> EncryptedShares:
        """Stage 2: check the neighbours' keys, secret-share the self-mask seed and masking key."""
        self._expect(ClientStage.ADVERTISED)
        adverts: dict[int, KeyAdvertisement] = {}
        enrolments: set[str] = set()
        for advert in request.adverts:
            if advert.node_id in adverts:
                raise InvalidMessage(f"two advertisements for node {advert.node_id}")
            self._check_advert(advert)
            if advert.certificate is not None:
                if advert.certificate.enrolment_id in enrolments:
                    raise InvalidMessage("one enrolled device appears twice among the neighbours")
                enrolments.add(advert.certificate.enrolment_id)
            adverts[advert.node_id] = advert
        if len(adverts) < self._setup.threshold:
            raise ProtocolAbort(
                "share-keys",
                set(self._neighbours) - set(adverts),
                f"{len(adverts)} neighbours advertised keys, threshold {self._setup.threshold}",
            )
        shares = split(
            [self._self_seed, self._mask.private],
            threshold=self._setup.threshold,
            num_shares=len(self._neighbours),
            rng=self._rng,
        )
        ciphertexts = {}
        for row, holder in enumerate(self._neighbours):
            if holder not in adverts:
                continue
            key = self._share_key(holder, adverts[holder])
            bundle = _BUNDLE.pack(self._setup.node_id, holder, *shares[row].tolist())
            ciphertexts[holder] = seal(
                key,
                bundle,
                share_associated_data(self._setup.round_id, self._setup.node_id, holder),
                self._rng,
            )
        self._adverts = adverts
        self._stage = ClientStage.SHARED
        return EncryptedShares(node_id=self._setup.node_id, ciphertexts=ciphertexts)

    def masked_input(
        self,
        request: MaskedInputRequest,
        encoded: npt.NDArray[np.unsignedinteger[Any]],
        *,
        consume: bool = False,
    ) -> MaskedInput:
        """Stage 3: store the shares received and send the update masked by every live pair.

        With ``consume`` the masks are added to ``encoded`` in place (saving a
        copy of the whole vector); the caller must not use it afterwards.
        """
        self._expect(ClientStage.SHARED)
        encoding = self._setup.encoding
        if encoded.dtype != encoding.dtype or encoded.shape != (self._setup.vector_length,):
            raise InvalidMessage(
                f"the encoded update must be {encoding.dtype} of length {self._setup.vector_length}"
            )
        held: dict[int, npt.NDArray[np.uint32]] = {}
        for sender, sealed in request.ciphertexts.items():
            if sender not in self._adverts:
                raise InvalidMessage(f"shares from {sender}, who did not advertise to us")
            key = self._share_key(sender, self._adverts[sender])
            plain = open_sealed(
                key,
                sealed,
                share_associated_data(self._setup.round_id, sender, self._setup.node_id),
            )
            if len(plain) != _BUNDLE.size:
                raise CryptoError
            owner, holder, *values = _BUNDLE.unpack(plain)
            if owner != sender or holder != self._setup.node_id:
                raise CryptoError
            held[sender] = np.asarray(values, dtype=np.uint32)
        if len(held) < self._setup.threshold:
            raise ProtocolAbort(
                "masked-input",
                set(self._adverts) - set(held),
                f"shares from {len(held)} neighbours, threshold {self._setup.threshold}",
            )
        masks = [(self._self_seed, False)]
        mask_key = X25519PrivateKey.from_private_bytes(self._mask.private)
        for partner in sorted(held):
            seed = pairwise_mask_seed(
                mask_key,
                self._adverts[partner].mask_public,
                round_id=self._setup.round_id,
                node=self._setup.node_id,
                peer=partner,
            )
            masks.append((seed, not adds_pairwise_mask(self._setup.node_id, partner)))
        masked = encoded if consume else encoded.copy()
        apply_masks(masked, masks)
        if encoding.ring_bits < masked.dtype.itemsize * 8:
            np.bitwise_and(masked, masked.dtype.type(encoding.ring_mask), out=masked)
        self._held = held
        self._partners = tuple(sorted(held))
        self._stage = ClientStage.MASKED
        return MaskedInput(node_id=self._setup.node_id, vector=masked)

    def _check_survivors(self, survivors: tuple[int, ...]) -> None:
        if len(set(survivors)) != len(survivors) or self._setup.node_id not in survivors:
            raise InvalidMessage("the survivor set must be distinct and include this node")

    def confirm(self, request: ConsistencyRequest) -> ConsistencySignature:
        """Stage 4 (active model): sign the survivor set as shown to this client."""
        self._expect(ClientStage.MASKED)
        if self._identity is None:
            raise InvalidMessage("the consistency check runs only in the active model")
        self._check_survivors(request.survivors)
        self._survivors = tuple(sorted(request.survivors))
        self._stage = ClientStage.CONFIRMED
        return ConsistencySignature(
            node_id=self._setup.node_id,
            signature=self._identity.sign(survivors_message(self._setup.round_id, self._survivors)),
        )

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Stage 5: reveal self-mask shares of surviving partners, key shares of dropped ones."""
        active = self._setup.threat_model is ThreatModel.ACTIVE
        self._expect(ClientStage.CONFIRMED if active else ClientStage.MASKED)
        self._check_survivors(request.survivors)
        survivors = tuple(sorted(request.survivors))
        if active:
            if survivors != self._survivors:
                raise ProtocolAbort("unmask", [], "the server changed the survivor set")
            message = survivors_message(self._setup.round_id, survivors)
            confirmed = 0
            for signer, signature in request.signatures.items():
                advert = self._adverts.get(signer)
                if advert is None or advert.certificate is None:
                    continue  # not a neighbour: cannot check, does not count
                verify_signature(advert.certificate.public_key, signature, message)
                confirmed += 1
            if confirmed < self._setup.threshold:
                raise ProtocolAbort(
                    "unmask",
                    [],
                    f"{confirmed} neighbours confirmed the survivor set, "
                    f"threshold {self._setup.threshold}",
                )
        live = set(survivors)
        self_mask_shares = {}
        mask_key_shares = {}
        for partner in self._partners:
            share = self._held[partner]
            if partner in live:
                self_mask_shares[partner] = share[:CHUNKS_PER_SECRET].copy()
            else:
                mask_key_shares[partner] = share[CHUNKS_PER_SECRET:].copy()
        self._stage = ClientStage.DONE
        return UnmaskResponse(
            node_id=self._setup.node_id,
            self_mask_shares=self_mask_shares,
            mask_key_shares=mask_key_shares,
        )


_STATE_VERSION = 1


def _export(session: ClientSession) -> bytes:
    w = Writer()
    w.u8(_STATE_VERSION)
    w.section(wire.encode(session._setup))
    w.blob(session._stage.value.encode())
    for pair in (session._enc, session._mask):
        w.fixed(pair.private, KEY_BYTES)
        w.fixed(pair.public, KEY_BYTES)
    w.fixed(session._self_seed, SEED_BYTES)
    w.u32(len(session._adverts))
    for node in sorted(session._adverts):
        w.section(wire.encode(session._adverts[node]))
    w.u32(len(session._share_keys))
    for node in sorted(session._share_keys):
        w.u64(node)
        w.fixed(session._share_keys[node], KEY_BYTES)
    w.shares({n: s[:CHUNKS_PER_SECRET] for n, s in session._held.items()})
    w.shares({n: s[CHUNKS_PER_SECRET:] for n, s in session._held.items()})
    w.ids(session._survivors)
    return w.getvalue()


def _restore(state: bytes, rng: RandomSource, identity: NodeIdentity | None) -> ClientSession:
    r = Reader(state)
    if r.u8() != _STATE_VERSION:
        raise InvalidMessage("unsupported client state version")
    setup = wire.decode(r.section(), RoundSetup)
    session = ClientSession.__new__(ClientSession)
    session._setup = setup
    session._rng = rng
    session._identity = identity
    try:
        session._stage = ClientStage(r.blob().decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidMessage("invalid client state stage") from exc
    session._neighbours = tuple(sorted(setup.neighbours))
    # The public halves travel with the private ones: no scalar multiplication
    # per message (the state never leaves the device, so it is trusted).
    session._enc = AgreementKeyPair(private=r.fixed(KEY_BYTES), public=r.fixed(KEY_BYTES))
    session._mask = AgreementKeyPair(private=r.fixed(KEY_BYTES), public=r.fixed(KEY_BYTES))
    session._enc_loaded = None
    session._self_seed = r.fixed(SEED_BYTES)
    adverts = [wire.decode(r.section(), KeyAdvertisement) for _ in range(r.count())]
    session._adverts = {a.node_id: a for a in adverts}
    session._share_keys = {}
    for _ in range(r.count()):
        node = r.u64()
        session._share_keys[node] = r.fixed(KEY_BYTES)
    self_part, key_part = r.shares(), r.shares()
    if set(self_part) != set(key_part):
        raise InvalidMessage("inconsistent client state")
    session._held = {n: np.concatenate([self_part[n], key_part[n]]) for n in self_part}
    session._partners = tuple(sorted(session._held))
    session._survivors = r.distinct_ids()
    r.finish()
    return session
