"""The client side of a SecAgg+ round as a state machine (Bell et al. 2020, Bonawitz et al. 2017).

One :class:`ClientSession` per round. Its methods must be called in stage
order; each validates the server's message before acting and raises
:class:`InvalidMessage`, :class:`CryptoError`, :class:`PolicyViolation` or
:class:`ProtocolAbort` instead of continuing on bad input.

Notes
-----
Privacy invariants kept here, not trusted to the server:

- the round's parameters are checked against the device's own
  :class:`~secure_agg.policy.ProtocolPolicy` before any key exists; the
  enrolment authority's key comes from the policy, never from the server;
- the client draws its own holders (:func:`secure_agg.graph.choose_holders`),
  so the server cannot surround it with corrupt ones; only a semi-honest policy
  with ``accept_server_graph`` takes holders from the server instead
  (:meth:`ClientSession.share_and_mask`: two trips a round);
- every neighbour's advertisement must carry the digest of the very setup this
  client received (and, in the active model, be signed by an identity the
  pinned authority certified, whose certificate has not expired on the
  device's own clock and is not on the device's own revocation list);
- for each sender whose shares it holds, a client reveals either the self-mask
  share (sender survived) or the masking-key share (sender dropped), never both,
  and the pairwise seeds only of partners outside the survivor set;
- it reveals nothing for a survivor set below the policy's minimum, or one in
  which fewer than t of its own holders survived with its masks; in the active
  model, nothing unless t of its own holders signed the very set it was shown.

A bundle that does not open, or that a partner who drew this client as a
holder never sent, is that partner's failure: the client does not mask with it
and reports it (:attr:`MaskedInput.rejected`), and the round goes on without it.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Mapping, Sequence, Set
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
from secure_agg.errors import CryptoError, InvalidMessage, PolicyViolation, ProtocolAbort
from secure_agg.graph import choose_holders
from secure_agg.identity import IdentityCertificate, NodeIdentity
from secure_agg.masking import adds_pairwise_mask, pairwise_mask_seed, self_mask_commitment
from secure_agg.messages import (
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    MaskedInputRequest,
    PreKey,
    PrekeyedShares,
    RoundSetup,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskResponse,
    advert_message,
    setup_digest,
    survivors_message,
)
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from secure_agg.prekeys import PendingPreKey, check_prekey
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


def _claim_enrolment(claimed: set[str], certificate: IdentityCertificate | None) -> bool:
    """Add ``certificate``'s enrolment id to ``claimed``; False if it was there already."""
    if certificate is None:
        return True
    if certificate.enrolment_id in claimed:
        return False
    claimed.add(certificate.enrolment_id)
    return True


def _check_shape(setup: RoundSetup) -> None:
    participants = setup.participants
    if any(a >= b for a, b in itertools.pairwise(participants)):
        raise InvalidMessage("the participant list must be sorted and distinct")


def _checked_server_holders(
    setup: RoundSetup,
    policy: ProtocolPolicy,
    prekey: PendingPreKey | None,
    holders: tuple[int, ...],
) -> tuple[int, ...]:
    if not policy.accept_server_graph or setup.threat_model is not ThreatModel.SEMI_HONEST:
        raise PolicyViolation("the device's policy does not let the server draw the holders")
    if prekey is None:
        raise InvalidMessage("a server-drawn graph needs a round keyed in advance")
    if len(holders) != setup.degree or not _other_participants(setup, holders):
        raise InvalidMessage(f"the server's holders are not {setup.degree} other participants")
    return holders


def _other_participants(setup: RoundSetup, nodes: tuple[int, ...]) -> bool:
    """Whether ``nodes`` are sorted, distinct participants other than this client."""
    return (
        all(a < b for a, b in itertools.pairwise(nodes))
        and setup.node_id not in nodes
        and set(nodes) <= set(setup.participants)
    )


class ClientSession:
    """Run one round of SecAgg+ for one client.

    Parameters
    ----------
    setup
        The server's round setup for this client.
    policy
        The device's own policy; the setup is checked against it first.
    rng
        Source of keys, holders, the self-mask seed, share polynomials and nonces.
    identity
        The enrolment identity (required in the active model).
    prekey
        The device's pending pre-key, for a round keyed in advance
        (:meth:`share_prekeyed` replaces :meth:`advertise` and :meth:`share_keys`);
        the session uses its key pairs instead of fresh ones. The caller must
        delete its own copy: a pre-key serves one round.
    holders
        In a round keyed in advance on a server-drawn graph (semi-honest model,
        a policy with ``accept_server_graph``): the holders the server drew for
        this client, used instead of drawing its own (:meth:`share_and_mask`).

    Raises
    ------
    PolicyViolation
        If the setup is outside the policy, or the server drew the graph and the
        policy does not accept that.
    InvalidMessage
        If the setup is malformed, the active model lacks an identity, the
        pre-key belongs to another node, or the server's holders are not k
        distinct other participants.
    """

    def __init__(
        self,
        setup: RoundSetup,
        *,
        policy: ProtocolPolicy,
        rng: RandomSource,
        identity: NodeIdentity | None = None,
        prekey: PendingPreKey | None = None,
        holders: Sequence[int] | None = None,
    ) -> None:
        _check_shape(setup)
        policy.check_setup(setup)
        if policy.threat_model is ThreatModel.ACTIVE and identity is None:
            raise InvalidMessage("the active model needs this device's enrolment identity")
        self._setup = setup
        self._policy = policy
        self._rng = rng
        self._identity = identity
        self._digest = setup_digest(setup)
        self._stage = ClientStage.CREATED
        self._server_graph = holders is not None
        if holders is None:
            self._holders = choose_holders(setup.participants, setup.node_id, setup.degree, rng)
        else:
            self._holders = _checked_server_holders(setup, policy, prekey, tuple(holders))
        # On a server-drawn graph: the clients that drew this one (their bundles come at unmask).
        self._drawn_by: tuple[int, ...] = ()
        if prekey is None:
            self._enc = AgreementKeyPair.generate(rng)
            self._mask = AgreementKeyPair.generate(rng)
        else:
            if prekey.node_id != setup.node_id:
                raise InvalidMessage("the pre-key belongs to another node")
            self._enc, self._mask = prekey.enc, prekey.mask
        self._prekeyed = prekey is not None
        # In a round keyed in advance: the pre-keys (enc, mask) of the holders sealed to
        # (on a server-drawn graph: of every neighbour).
        self._holder_keys: dict[int, tuple[bytes, bytes]] = {}
        self._self_seed = rng.random_bytes(SEED_BYTES)
        self._adverts: dict[int, KeyAdvertisement] = {}
        self._share_keys: dict[int, bytes] = {}
        self._enc_loaded: X25519PrivateKey | None = None
        self._held: dict[int, npt.NDArray[np.uint32]] = {}
        # On a server-drawn graph, at unmask: each sender's pairwise-seed shares, by partner.
        self._masked_with: tuple[int, ...] = ()
        self._rejected: tuple[int, ...] = ()
        self._survivors: tuple[int, ...] = ()
        self._required_survivors = 0

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

    @property
    def holders(self) -> tuple[int, ...]:
        """The holders this client drew."""
        return self._holders

    def require_survivors(self, count: int) -> None:
        """Reveal nothing unless at least ``count`` clients are in the sum (e.g. for DP noise)."""
        self._required_survivors = max(self._required_survivors, count)

    def export_state(self) -> bytes:
        """Return the session's full state, secrets included, to resume it in another process.

        Notes
        -----
        The bytes hold this round's private keys, self-mask seed and the shares
        held for neighbours: keep them on the device (Flower's ``Context.state``
        stays on the node) and never log or send them. The policy is not in
        them: :meth:`restore` takes the device's own again.
        """
        return _export(self)

    @classmethod
    def restore(
        cls,
        state: bytes,
        *,
        policy: ProtocolPolicy,
        rng: RandomSource,
        identity: NodeIdentity | None = None,
    ) -> ClientSession:
        """Resume a session from :meth:`export_state`'s bytes under the device's policy.

        Raises
        ------
        InvalidMessage
            If the state is malformed or the active model lacks an identity.
        PolicyViolation
            If the saved setup is outside ``policy``.
        """
        session = _restore(state, policy, rng, identity)
        if policy.threat_model is ThreatModel.ACTIVE and identity is None:
            raise InvalidMessage("the active model needs this device's enrolment identity")
        return session

    def _expect(self, stage: ClientStage) -> None:
        if self._stage is not stage:
            raise InvalidMessage(
                f"out of order: expected after {stage.value}, at {self._stage.value}"
            )

    def advertise(self) -> KeyAdvertisement:
        """Stage 1: publish this round's public keys, the self-mask commitment and the holders."""
        self._expect(ClientStage.CREATED)
        advert = KeyAdvertisement(
            node_id=self._setup.node_id,
            enc_public=self._enc.public,
            mask_public=self._mask.public,
            self_mask_commitment=self_mask_commitment(
                self._setup.round_id, self._setup.node_id, self._self_seed
            ),
            holders=self._holders,
            setup_digest=self._digest,
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

    def _check_advert(
        self, advert: KeyAdvertisement, *, now: int | None, revoked: Set[str]
    ) -> None:
        me = self._setup.node_id
        if advert.node_id == me or advert.node_id not in self._setup.participants:
            raise InvalidMessage(f"advertisement from {advert.node_id}, not another participant")
        if advert.node_id not in self._holders and me not in advert.holders:
            raise InvalidMessage(f"advertisement from {advert.node_id}, not a neighbour")
        if advert.setup_digest != self._digest:
            raise InvalidMessage(
                f"node {advert.node_id} was shown another round setup (participants, k, t or ring)"
            )
        holders = advert.holders
        if len(holders) != self._setup.degree or advert.node_id in holders:
            raise InvalidMessage(f"advertisement from {advert.node_id} names invalid holders")
        if len(advert.enc_public) != KEY_BYTES or len(advert.mask_public) != KEY_BYTES:
            raise InvalidMessage(f"advertisement from {advert.node_id} has malformed keys")
        if self._policy.threat_model is ThreatModel.ACTIVE:
            if advert.certificate is None or advert.signature is None:
                raise CryptoError
            # Forged, expired and revoked certificates fail alike (opaquely).
            self._policy.check_certificate(advert.certificate, now=now, revoked=revoked)
            verify_signature(
                advert.certificate.public_key,
                advert.signature,
                advert_message(self._setup.round_id, advert),
            )

    def _share_key(self, peer: int, enc_public: bytes) -> bytes:
        cached = self._share_keys.get(peer)
        if cached is not None:
            return cached
        key = derive_pair_key(
            self._enc_key(),
            enc_public,
            purpose=KeyPurpose.SHARE_ENCRYPTION,
            round_id=self._setup.round_id,
            node_a=self._setup.node_id,
            node_b=peer,
        )
        self._share_keys[peer] = key
        return key

    def _seal_shares(self, recipients: dict[int, bytes]) -> dict[int, bytes]:
        """Secret-share the self-mask seed and masking key; seal each recipient holder's share.

        ``recipients`` maps holders to their share-encryption public keys; every
        holder's share is drawn (row = its place among the holders), only theirs sealed.
        """
        me = self._setup.node_id
        shares = split(
            [self._self_seed, self._mask.private],
            threshold=self._setup.threshold,
            num_shares=len(self._holders),
            rng=self._rng,
        )
        ciphertexts = {}
        for row, holder in enumerate(self._holders):
            if holder not in recipients:
                continue
            bundle = _BUNDLE.pack(me, holder, *shares[row].tolist())
            ciphertexts[holder] = seal(
                self._share_key(holder, recipients[holder]),
                bundle,
                share_associated_data(self._setup.round_id, me, holder),
                self._rng,
            )
        return ciphertexts

    def _seal_graph_shares(
        self, partners: tuple[int, ...], seeds: Mapping[int, bytes]
    ) -> dict[int, bytes]:
        """Share the self-mask seed, the masking key and every pairwise seed; seal to each holder.

        On a server-drawn graph a client masks with neighbours that may never
        answer; if it then falls silent at unmask, t of its holders can still
        reveal its seed with each partner outside the sum (never its key, which
        would unmask the clients it survived with).
        """
        me = self._setup.node_id
        secrets = [self._self_seed, self._mask.private, *(seeds[p] for p in partners)]
        shares = split(
            secrets,
            threshold=self._setup.threshold,
            num_shares=len(self._holders),
            rng=self._rng,
        )
        ciphertexts = {}
        for row, holder in enumerate(self._holders):
            w = Writer()
            w.u64(me)
            w.u64(holder)
            w.ids(partners)
            w.fixed(shares[row].astype(">u4").tobytes(), 4 * shares.shape[1])
            ciphertexts[holder] = seal(
                self._share_key(holder, self._holder_keys[holder][0]),
                w.getvalue(),
                share_associated_data(self._setup.round_id, me, holder),
                self._rng,
            )
        return ciphertexts

    def _open_graph_bundle(
        self, sender: int, sealed: bytes
    ) -> tuple[npt.NDArray[np.uint32], tuple[tuple[int, ...], npt.NDArray[np.uint32]]] | None:
        """Open a server-drawn graph's bundle: its self-mask and key shares, its seed shares.

        The seed shares come as the sender's partners and a (partners x 11) matrix.
        """
        me = self._setup.node_id
        try:
            key = self._share_key(sender, self._holder_keys[sender][0])
            r = Reader(open_sealed(key, sealed, share_associated_data(self.round_id, sender, me)))
            if (r.u64(), r.u64()) != (sender, me):
                return None
            partners = r.distinct_ids()
            width = CHUNKS_PER_SECRET * (2 + len(partners))
            values = np.frombuffer(r.fixed(4 * width), dtype=">u4").astype(np.uint32)
            r.finish()
        except (CryptoError, InvalidMessage):
            return None
        if me not in partners:
            return None
        pairs = values[2 * CHUNKS_PER_SECRET :].reshape(len(partners), CHUNKS_PER_SECRET)
        return values[: 2 * CHUNKS_PER_SECRET], (partners, pairs)

    def _own_enrolments(self) -> set[str]:
        return set() if self._identity is None else {self._identity.certificate.enrolment_id}

    def _checked_adverts(
        self, received: Sequence[KeyAdvertisement], *, now: int | None, revoked: Set[str]
    ) -> dict[int, KeyAdvertisement]:
        adverts: dict[int, KeyAdvertisement] = {}
        enrolments = self._own_enrolments()
        for advert in received:
            if advert.node_id in adverts:
                raise InvalidMessage(f"two advertisements for node {advert.node_id}")
            self._check_advert(advert, now=now, revoked=revoked)
            if not _claim_enrolment(enrolments, advert.certificate):
                raise InvalidMessage("one enrolled device appears twice among the neighbours")
            sealed_to = self._holder_keys.get(advert.node_id)
            if sealed_to is not None and sealed_to != (advert.enc_public, advert.mask_public):
                raise InvalidMessage(
                    f"node {advert.node_id} advertises other keys than the pre-key "
                    "this client sealed its shares to"
                )
            adverts[advert.node_id] = advert
        return adverts

    def _prekeys_by_node(self, prekeys: Sequence[PreKey]) -> dict[int, PreKey]:
        """Index the relayed pre-keys: one per participant, this device's own the one it holds."""
        by_node = {p.node_id: p for p in prekeys}
        if len(by_node) != len(prekeys) or set(by_node) != set(self._setup.participants):
            raise InvalidMessage("a round keyed in advance needs one pre-key per participant")
        own = by_node[self._setup.node_id]
        if (own.enc_public, own.mask_public) != (self._enc.public, self._mask.public):
            raise InvalidMessage(
                "the round names a pre-key this device does not hold (replaced or already used)"
            )
        return by_node

    def share_prekeyed(
        self,
        prekeys: Sequence[PreKey],
        *,
        now: int | None = None,
        revoked: Set[str] = frozenset(),
    ) -> PrekeyedShares:
        """Stages 1 and 2 at once: advertise, and seal the shares to the holders' pre-keys.

        Parameters
        ----------
        prekeys
            Every participant's pre-key as the server relays them (one per
            participant, this device's own among them).
        now, revoked
            The device's own clock and revocation list (see :meth:`share_keys`).

        Raises
        ------
        InvalidMessage
            If the session was not made with a pre-key, the list is not one key
            per participant, or this device's entry is not the key it holds (a
            replayed, replaced or already used pre-key).
        CryptoError
            In the active model, if a holder's pre-key is unsigned, forged, expired
            or revoked: nothing is shared.
        """
        self._expect(ClientStage.CREATED)
        if not self._prekeyed:
            raise InvalidMessage("this round was not keyed in advance")
        me = self._setup.node_id
        by_node = self._prekeys_by_node(prekeys)
        enrolments = self._own_enrolments()
        for holder in self._holders:
            prekey = by_node[holder]
            check_prekey(prekey, policy=self._policy, now=now, revoked=revoked)
            if not _claim_enrolment(enrolments, prekey.certificate):
                raise InvalidMessage("one enrolled device appears twice among the holders")
            self._holder_keys[holder] = (prekey.enc_public, prekey.mask_public)
        advert = self.advertise()
        ciphertexts = self._seal_shares({h: keys[0] for h, keys in self._holder_keys.items()})
        self._stage = ClientStage.SHARED
        return PrekeyedShares(advert, EncryptedShares(node_id=me, ciphertexts=ciphertexts))

    def share_and_mask(
        self,
        prekeys: Sequence[PreKey],
        drawn_by: Sequence[int],
        encoded: npt.NDArray[np.unsignedinteger[Any]],
        *,
        consume: bool = False,
    ) -> tuple[PrekeyedShares, MaskedInput]:
        """Stages 1 to 3 at once, on a server-drawn graph: advertise, share, and mask.

        The neighbours are the server's holders of this client and ``drawn_by``
        (the clients whose holders include it); the client masks with every one
        of them before knowing who else answers, and the server removes the masks
        of those that do not with the seeds the survivors reveal at unmask. The
        bundles addressed to this client come with the unmask request.

        Raises
        ------
        InvalidMessage
            If the session was not made on a server-drawn graph, ``drawn_by``
            names clients outside the round or this one, a pre-key is missing or
            malformed, or the encoded update has the wrong type or length.
        """
        if not self._server_graph:
            raise InvalidMessage("this round's holders were not drawn by the server")
        me = self._setup.node_id
        senders = tuple(drawn_by)
        if not _other_participants(self._setup, senders):
            raise InvalidMessage("the clients that drew this one must be other participants")
        self._check_encoded(encoded)
        self._expect(ClientStage.CREATED)
        by_node = self._prekeys_by_node(prekeys)
        partners = tuple(sorted(set(self._holders) | set(senders)))
        for partner in partners:
            prekey = by_node[partner]
            check_prekey(prekey, policy=self._policy, now=None, revoked=frozenset())
            self._holder_keys[partner] = (prekey.enc_public, prekey.mask_public)
        seeds = self._pair_seeds(partners)
        advert = self.advertise()
        ciphertexts = self._seal_graph_shares(partners, seeds)
        shares = PrekeyedShares(advert, EncryptedShares(node_id=me, ciphertexts=ciphertexts))
        masked = self._mask_with(encoded, seeds, consume=consume)
        self._drawn_by = senders
        self._masked_with = partners
        self._stage = ClientStage.MASKED
        return shares, MaskedInput(node_id=me, vector=masked)

    def share_keys(
        self,
        request: ShareKeysRequest,
        *,
        now: int | None = None,
        revoked: Set[str] = frozenset(),
    ) -> EncryptedShares:
        """Stage 2: check the neighbours' keys, secret-share the self-mask seed and masking key.

        Parameters
        ----------
        request
            The neighbours' advertisements, as the server relays them.
        now
            The device's own clock in Unix seconds (never a time from the
            server); ``None``: the device has none, and any neighbour whose
            certificate expires is refused.
        revoked
            The enrolment ids on the device's latest verified revocation list.

        Returns
        -------
        EncryptedShares
            One sealed share bundle per holder that advertised.

        Raises
        ------
        CryptoError
            In the active model, if a neighbour's certificate is missing,
            forged, expired or revoked, or its signature does not verify: the
            client shares nothing in this round.
        InvalidMessage
            If an advertisement is malformed, repeated or not a neighbour's.
        ProtocolAbort
            If fewer than t of this client's holders advertised.
        """
        self._expect(ClientStage.ADVERTISED)
        if self._prekeyed:
            raise InvalidMessage("a round keyed in advance has no share-keys stage")
        adverts = self._checked_adverts(request.adverts, now=now, revoked=revoked)
        threshold = self._setup.threshold
        live_holders = [h for h in self._holders if h in adverts]
        if len(live_holders) < threshold:
            raise ProtocolAbort(
                "share-keys",
                set(self._holders) - set(adverts),
                f"{len(live_holders)} of this client's holders advertised keys, "
                f"threshold {threshold}",
            )
        ciphertexts = self._seal_shares({h: adverts[h].enc_public for h in live_holders})
        self._adverts = adverts
        self._stage = ClientStage.SHARED
        return EncryptedShares(node_id=self._setup.node_id, ciphertexts=ciphertexts)

    def _partner_keys(self, partner: int) -> tuple[bytes, bytes]:
        """Return a partner's (enc, mask) public keys: from its advertisement, else its pre-key."""
        advert = self._adverts.get(partner)
        if advert is not None:
            return advert.enc_public, advert.mask_public
        return self._holder_keys[partner]

    def _check_encoded(self, encoded: npt.NDArray[np.unsignedinteger[Any]]) -> None:
        dtype, length = self._setup.encoding.dtype, self._setup.vector_length
        if encoded.dtype != dtype or encoded.shape != (length,):
            raise InvalidMessage(f"the encoded update must be {dtype} of length {length}")

    def _pair_seeds(self, partners: Iterable[int]) -> dict[int, bytes]:
        """Return the seed of the mask this client shares with each partner."""
        me = self._setup.node_id
        mask_key = X25519PrivateKey.from_private_bytes(self._mask.private)
        return {
            partner: pairwise_mask_seed(
                mask_key,
                self._partner_keys(partner)[1],
                round_id=self._setup.round_id,
                node=me,
                peer=partner,
            )
            for partner in partners
        }

    def _mask_with(
        self,
        encoded: npt.NDArray[np.unsignedinteger[Any]],
        seeds: Mapping[int, bytes],
        *,
        consume: bool,
    ) -> npt.NDArray[np.unsignedinteger[Any]]:
        """Add the self mask and each partner's mask (in place with ``consume``), in the ring."""
        me = self._setup.node_id
        masks = [(self._self_seed, False)]
        masks.extend((seed, not adds_pairwise_mask(me, p)) for p, seed in seeds.items())
        masked = encoded if consume else encoded.copy()
        apply_masks(masked, masks)
        encoding = self._setup.encoding
        if encoding.ring_bits < masked.dtype.itemsize * 8:
            np.bitwise_and(masked, masked.dtype.type(encoding.ring_mask), out=masked)
        return masked

    def _open_bundle(self, sender: int, sealed: bytes | None) -> npt.NDArray[np.uint32] | None:
        if sealed is None:
            return None
        me = self._setup.node_id
        try:
            key = self._share_key(sender, self._partner_keys(sender)[0])
            plain = open_sealed(key, sealed, share_associated_data(self.round_id, sender, me))
        except CryptoError:
            return None
        if len(plain) != _BUNDLE.size:
            return None
        owner, holder, *values = _BUNDLE.unpack(plain)
        if owner != sender or holder != me:
            return None
        return np.asarray(values, dtype=np.uint32)

    def masked_input(
        self,
        request: MaskedInputRequest,
        encoded: npt.NDArray[np.unsignedinteger[Any]],
        *,
        consume: bool = False,
        now: int | None = None,
        revoked: Set[str] = frozenset(),
    ) -> MaskedInput:
        """Stage 3: keep the shares received and send the update masked by every live partner.

        A partner that drew this client as a holder but whose bundle is missing
        or does not open is rejected (reported, not masked with). With
        ``consume`` the masks are added to ``encoded`` in place (saving a copy
        of the whole vector); the caller must not use it afterwards. In a round
        keyed in advance the request carries the neighbours' advertisements,
        checked here as :meth:`share_keys` checks them (``now``, ``revoked``),
        and a holder's must name the pre-key this client sealed its shares to.
        """
        self._expect(ClientStage.SHARED)
        if self._prekeyed:
            self._adverts = self._checked_adverts(request.adverts, now=now, revoked=revoked)
        elif request.adverts:
            raise InvalidMessage("this round relayed the advertisements at share-keys")
        self._check_encoded(encoded)
        me = self._setup.node_id
        partners = request.partners
        if len(set(partners)) != len(partners) or not set(partners) <= set(self._adverts):
            raise InvalidMessage("the partner list names clients that are not live neighbours")
        senders = {p for p in partners if me in self._adverts[p].holders}
        if not set(request.ciphertexts) <= senders:
            raise InvalidMessage("bundles from clients that did not draw this one as a holder")
        held: dict[int, npt.NDArray[np.uint32]] = {}
        rejected = []
        for sender in sorted(senders):
            share = self._open_bundle(sender, request.ciphertexts.get(sender))
            if share is None:
                rejected.append(sender)
            else:
                held[sender] = share
        masked_with = tuple(p for p in sorted(partners) if p not in rejected)
        live_holders = len(set(masked_with).intersection(self._holders))
        if live_holders < self._setup.threshold:
            raise ProtocolAbort(
                "masked-input",
                set(self._holders) - set(masked_with),
                f"{live_holders} of this client's holders shared keys, "
                f"threshold {self._setup.threshold}",
            )
        masked = self._mask_with(encoded, self._pair_seeds(masked_with), consume=consume)
        self._held = held
        self._masked_with = masked_with
        self._rejected = tuple(rejected)
        self._stage = ClientStage.MASKED
        return MaskedInput(node_id=me, vector=masked, rejected=self._rejected)

    def _check_survivors(self, survivors: tuple[int, ...]) -> None:
        me = self._setup.node_id
        if len(set(survivors)) != len(survivors) or me not in survivors:
            raise InvalidMessage("the survivor set must be distinct and include this node")
        if not set(survivors) <= set(self._setup.participants):
            raise InvalidMessage("the survivor set names clients outside the round")
        if set(survivors).intersection(self._rejected):
            raise InvalidMessage("the survivor set includes a client whose shares failed here")
        self._policy.check_survivors(len(survivors), required=self._required_survivors)
        kept = set(survivors).intersection(self._masked_with).intersection(self._holders)
        if len(kept) < self._setup.threshold:
            raise ProtocolAbort(
                "unmask",
                [],
                f"{len(kept)} of this client's holders are in the survivor set, "
                f"threshold {self._setup.threshold}",
            )

    def confirm(self, request: ConsistencyRequest) -> ConsistencySignature:
        """Stage 4 (active model): sign the survivor set as shown to this client."""
        self._expect(ClientStage.MASKED)
        if self._identity is None or self._policy.threat_model is not ThreatModel.ACTIVE:
            raise InvalidMessage("the consistency check runs only in the active model")
        self._check_survivors(request.survivors)
        self._survivors = tuple(sorted(request.survivors))
        self._stage = ClientStage.CONFIRMED
        return ConsistencySignature(
            node_id=self._setup.node_id,
            signature=self._identity.sign(survivors_message(self._setup.round_id, self._survivors)),
        )

    def _count_confirmations(self, survivors: tuple[int, ...], request: UnmaskRequest) -> None:
        # Only this client's own holders count: it drew them, so at most c_max
        # of them collude; t signatures leave at least t - c_max honest ones
        # that saw (and will act on) the very same set.
        message = survivors_message(self._setup.round_id, survivors)
        confirmed = 0
        for signer, signature in request.signatures.items():
            advert = self._adverts.get(signer)
            if signer not in self._holders or advert is None or advert.certificate is None:
                continue
            verify_signature(advert.certificate.public_key, signature, message)
            confirmed += 1
        if confirmed < self._setup.threshold:
            raise ProtocolAbort(
                "unmask",
                [],
                f"{confirmed} of this client's holders confirmed the survivor set, "
                f"threshold {self._setup.threshold}",
            )

    def _receive_bundles(
        self, ciphertexts: Mapping[int, bytes]
    ) -> dict[int, tuple[tuple[int, ...], npt.NDArray[np.uint32]]]:
        """Keep the shares of the clients that drew this one (a server-drawn graph's inbox).

        A bundle that does not open is left out (this client then reveals
        nothing for its sender); the survivor set is already fixed. Returns each
        sender's seed shares: its partners, and one row of 11 chunks per partner.
        """
        if not set(ciphertexts) <= set(self._drawn_by):
            raise InvalidMessage("bundles from clients that did not draw this one as a holder")
        held = {}
        pairs = {}
        for sender in sorted(ciphertexts):
            opened = self._open_graph_bundle(sender, ciphertexts[sender])
            if opened is not None:
                held[sender], pairs[sender] = opened
        self._held = held
        return pairs

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Stage 5: reveal self-mask shares of surviving senders, key shares of dropped ones."""
        active = self._policy.threat_model is ThreatModel.ACTIVE
        self._expect(ClientStage.CONFIRMED if active else ClientStage.MASKED)
        if self._server_graph:
            pairs = self._receive_bundles(request.ciphertexts)
        elif request.ciphertexts:
            raise InvalidMessage("this round delivered its bundles at masked input")
        else:
            pairs = {}
        self._check_survivors(request.survivors)
        survivors = tuple(sorted(request.survivors))
        if active:
            if survivors != self._survivors:
                raise ProtocolAbort("unmask", [], "the server changed the survivor set")
            self._count_confirmations(survivors, request)
        live = set(survivors)
        self_mask_shares = {}
        mask_key_shares = {}
        pair_seed_shares = {}
        for sender in sorted(self._held):
            share = self._held[sender]
            if sender in live:
                self_mask_shares[sender] = share[:CHUNKS_PER_SECRET].copy()
                # What the sender itself reveals at unmask: its seeds with partners outside
                # the sum (so that its own silence now cannot strand their masks).
                if sender in pairs:
                    partners, rows = pairs[sender]
                    outside = {q: rows[i] for i, q in enumerate(partners) if q not in live}
                    if outside:
                        pair_seed_shares[sender] = outside
            else:
                mask_key_shares[sender] = share[CHUNKS_PER_SECRET:].copy()
        # The masks shared with partners outside the sum: what their keys would reveal.
        seeds = self._pair_seeds(p for p in self._masked_with if p not in live)
        self._stage = ClientStage.DONE
        return UnmaskResponse(
            node_id=self._setup.node_id,
            self_mask_shares=self_mask_shares,
            mask_key_shares=mask_key_shares,
            pairwise_seeds=seeds,
            pair_seed_shares=pair_seed_shares,
        )


_STATE_VERSION = 4


def _export(session: ClientSession) -> bytes:
    w = Writer()
    w.u8(_STATE_VERSION)
    w.section(wire.encode(session._setup))
    w.blob(session._stage.value.encode())
    w.ids(session._holders)
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
    w.ids(session._masked_with)
    w.ids(session._rejected)
    w.ids(session._survivors)
    w.u32(session._required_survivors)
    w.u8(1 if session._prekeyed else 0)
    w.u32(len(session._holder_keys))
    for node in sorted(session._holder_keys):
        w.u64(node)
        for key in session._holder_keys[node]:
            w.fixed(key, KEY_BYTES)
    w.u8(1 if session._server_graph else 0)
    w.ids(session._drawn_by)
    return w.getvalue()


def _restore(
    state: bytes, policy: ProtocolPolicy, rng: RandomSource, identity: NodeIdentity | None
) -> ClientSession:
    r = Reader(state)
    if r.u8() != _STATE_VERSION:
        raise InvalidMessage("unsupported client state version")
    setup = wire.decode(r.section(), RoundSetup)
    _check_shape(setup)
    policy.check_setup(setup)
    session = ClientSession.__new__(ClientSession)
    session._setup = setup
    session._policy = policy
    session._rng = rng
    session._identity = identity
    session._digest = setup_digest(setup)
    try:
        session._stage = ClientStage(r.blob().decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidMessage("invalid client state stage") from exc
    session._holders = r.distinct_ids()
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
    session._masked_with = r.distinct_ids()
    session._rejected = r.distinct_ids()
    session._survivors = r.distinct_ids()
    session._required_survivors = r.u32()
    flag = r.u8()
    if flag not in (0, 1):
        raise InvalidMessage("invalid client state flag")
    session._prekeyed = flag == 1
    session._holder_keys = {}
    for _ in range(r.count()):
        node = r.u64()
        session._holder_keys[node] = (r.fixed(KEY_BYTES), r.fixed(KEY_BYTES))
    graph = r.u8()
    if graph not in (0, 1):
        raise InvalidMessage("invalid client state flag")
    session._server_graph = graph == 1
    if session._server_graph and not policy.accept_server_graph:
        raise PolicyViolation("the device's policy does not let the server draw the holders")
    session._drawn_by = r.distinct_ids()
    r.finish()
    return session
