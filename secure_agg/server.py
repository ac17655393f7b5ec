"""The server side of a SecAgg+ round as a state machine.

One :class:`ServerSession` per round: it hands every participant the same
setup, relays keys and sealed shares along the holder graph the clients drew
themselves, collects masked inputs and shares, and finally removes every mask
to obtain the exact modular sum of the survivors' encoded inputs and nothing
else.

A client that sends a malformed or unverifiable message at any stage is
treated as dropped at that stage, and so is a client whose shares do not
reach every live holder it drew, or that a holder reports it could not open:
its failure is its own, the others carry on. The round aborts only when some
client whose masks must be removed no longer has ``threshold`` live holders,
or when no set of shares reconstructs a committed secret (the sum would not
be exact, and is never produced).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import numpy as np
import numpy.typing as npt

from secure_agg.crypto import KEY_BYTES, public_key_of, verify_signature
from secure_agg.encoding import EncodingConfig
from secure_agg.errors import CryptoError, InvalidMessage, ProtocolAbort
from secure_agg.graph import choose_holders, neighbours_of
from secure_agg.masking import adds_pairwise_mask, pairwise_mask_seed, self_mask_commitment
from secure_agg.messages import (
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    GraphSetup,
    KeyAdvertisement,
    MaskedInput,
    MaskedInputRequest,
    PreKey,
    PrekeyedSetup,
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
from secure_agg.prg import apply_masks
from secure_agg.randomness import RandomSource
from secure_agg.shamir import CHUNKS_PER_SECRET, PRIME, combine

__all__ = ["ServerSession", "ServerStage", "UnmaskResult"]

logger = logging.getLogger(__name__)

_ROUND_ID_BYTES = 16
# Reconstruction tries other threshold-sized subsets of the shares when the
# first one fails its commitment (a holder lied); bounded so a flood of bad
# shares cannot make the server search forever.
_MAX_RECONSTRUCTION_TRIES = 64


class ServerStage(Enum):
    """Where a server session stands."""

    SETUP = "setup"
    KEYS = "keys"
    SHARES = "shares"
    MASKED = "masked"
    CONFIRMED = "confirmed"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class UnmaskResult:
    """The unmasked sum and who is in it."""

    total: npt.NDArray[np.unsignedinteger[Any]]
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    excluded: tuple[int, ...]


class ServerSession:
    """Run one round of SecAgg+ for the server.

    Parameters
    ----------
    participants
        The node ids sampled for the round (distinct).
    degree, threshold
        k, the holders each client draws (at most n - 1: a larger k means the
        classic SecAgg where every client holds every other's shares), and t (see
        :func:`secure_agg.params.choose_neighbourhood`).
    encoding
        The ring and quantisation every client uses.
    vector_length
        Encoded length (model size + 1 for the weight).
    threat_model
        Whether signatures and the consistency check are required.
    rng
        Source of the round id.
    authority_public_key
        The enrolment authority's key (active model).
    server_graph
        Semi-honest model, rounds keyed in advance: the server draws every
        client's holders (with ``rng``) and sends them with the setup, so the
        clients mask in their first reply (:meth:`graph_setups`,
        :meth:`receive_graph`): two full-fleet trips instead of three.
    """

    def __init__(
        self,
        participants: Sequence[int],
        *,
        degree: int,
        threshold: int,
        encoding: EncodingConfig,
        vector_length: int,
        threat_model: ThreatModel,
        rng: RandomSource,
        authority_public_key: bytes | None = None,
        server_graph: bool = False,
    ) -> None:
        nodes = tuple(sorted(participants))
        if len(set(nodes)) != len(nodes) or len(nodes) < 2:
            raise InvalidMessage("a round needs two or more distinct participants")
        if len(nodes) > encoding.max_clients:
            raise InvalidMessage(
                f"{len(nodes)} participants but the encoding allows {encoding.max_clients}"
            )
        degree = min(degree, len(nodes) - 1)  # k >= n - 1: every client holds every other's
        if not 1 <= threshold <= degree:
            raise InvalidMessage(f"need 1 <= threshold ({threshold}) <= degree ({degree})")
        if threat_model is ThreatModel.ACTIVE and authority_public_key is None:
            raise InvalidMessage("the active model needs the enrolment authority's key")
        if server_graph and threat_model is not ThreatModel.SEMI_HONEST:
            raise InvalidMessage("only the semi-honest model lets the server draw the holders")
        self._round_id = rng.random_bytes(_ROUND_ID_BYTES)
        self._participants = nodes
        self._degree = degree
        self._threshold = threshold
        self._encoding = encoding
        self._length = vector_length
        self._threat = threat_model
        self._authority = authority_public_key
        self._stage = ServerStage.SETUP
        self._digest = setup_digest(self._setup_for(nodes[0]))
        self._adverts: dict[int, KeyAdvertisement] = {}
        self._neighbours: dict[int, tuple[int, ...]] = {}
        self._shared: set[int] = set()
        self._partners: dict[int, tuple[int, ...]] = {}
        self._masked: dict[int, npt.NDArray[np.unsignedinteger[Any]]] = {}
        # The survivors' masked sum: once the survivors are fixed, their vectors are added
        # up and dropped (1,000 clients x 1M values would otherwise stay for two stages).
        self._masked_sum: npt.NDArray[np.unsignedinteger[Any]] | None = None
        self._rejected: dict[int, frozenset[int]] = {}
        self._survivors: tuple[int, ...] = ()
        self._signatures: dict[int, bytes] = {}
        self._prekeys: dict[int, PreKey] = {}
        # A server-drawn graph: every participant's holders, fixed before anyone answers.
        self._assigned: dict[int, tuple[int, ...]] = (
            {n: choose_holders(nodes, n, degree, rng) for n in nodes} if server_graph else {}
        )
        self.excluded: dict[int, str] = {}

    @property
    def round_id(self) -> bytes:
        """The random id every key, share and signature of the round is bound to."""
        return self._round_id

    @property
    def degree(self) -> int:
        """k, the holders each client draws."""
        return self._degree

    @property
    def neighbours(self) -> Mapping[int, tuple[int, ...]]:
        """Each live client's neighbours (known once the advertisements are in)."""
        return self._neighbours

    def identity_of(self, node: int) -> str | None:
        """Return the enrolment id a live client's certified advertisement names, if any."""
        advert = self._adverts.get(node)
        return (
            None
            if advert is None or advert.certificate is None
            else advert.certificate.enrolment_id
        )

    def _expect(self, stage: ServerStage) -> None:
        if self._stage is not stage:
            raise InvalidMessage(f"out of order: expected {stage.value}, at {self._stage.value}")

    def _exclude(self, node: int, reason: str) -> None:
        logger.warning("secure aggregation: excluding node %d: %s", node, reason)
        self.excluded.setdefault(node, reason)

    def _holders(self, node: int) -> tuple[int, ...]:
        if self._assigned:
            return self._assigned[node]
        return self._adverts[node].holders

    def _holding(self, owner: int, live: set[int]) -> int:
        """How many live clients hold a usable share of ``owner``'s secrets.

        Before the masked inputs every live holder counts; after them, not one
        that reported ``owner``'s bundle as unopenable.
        """
        return sum(
            1
            for holder in live.intersection(self._holders(owner))
            if owner not in self._rejected.get(holder, ())
        )

    def _prune(self, live: set[int], stage: str) -> set[int]:
        """Leave out, until none is left, every client with fewer than t usable live holders.

        Such a client's secrets could not be rebuilt: it is treated as dropped (after
        the masked inputs its honest holders then reveal its key share, never its
        self-mask share, so it stays private). Nobody is asked to reveal anything
        before this holds.

        Raises
        ------
        ProtocolAbort
            If fewer than two clients are left.
        """
        live = set(live)
        while starved := [n for n in live if self._holding(n, live) < self._threshold]:
            for node in sorted(starved):
                self._exclude(node, f"{stage}: fewer than {self._threshold} usable holders left")
            live -= set(starved)
        if len(live) < 2:
            raise ProtocolAbort(stage, self._participants, f"{len(live)} clients left")
        return live

    def _setup_for(self, node: int) -> RoundSetup:
        return RoundSetup(
            round_id=self._round_id,
            node_id=node,
            participants=self._participants,
            degree=self._degree,
            threshold=self._threshold,
            encoding=self._encoding,
            vector_length=self._length,
            threat_model=self._threat,
        )

    def setups(self) -> dict[int, RoundSetup]:
        """Stage 0: the setup message of every participant."""
        self._expect(ServerStage.SETUP)
        self._stage = ServerStage.KEYS
        return {node: self._setup_for(node) for node in self._participants}

    def prekeyed_setups(self, prekeys: Mapping[int, PreKey]) -> dict[int, PrekeyedSetup]:
        """Stages 0-1 of a round keyed in advance: the setup with every participant's pre-key.

        ``prekeys`` holds one announced pre-key per participant (checked on arrival,
        :func:`secure_agg.prekeys.prekey_problem`); every request shares one tuple.
        """
        self._expect(ServerStage.SETUP)
        if set(prekeys) != set(self._participants):
            raise InvalidMessage("a round keyed in advance needs one pre-key per participant")
        if any(prekeys[n].node_id != n for n in self._participants):
            raise InvalidMessage("a pre-key filed under another node")
        self._prekeys = dict(prekeys)
        ordered = tuple(prekeys[n] for n in self._participants)
        self._stage = ServerStage.KEYS
        return {node: PrekeyedSetup(self._setup_for(node), ordered) for node in self._participants}

    def receive_prekeyed(
        self, replies: Mapping[int, PrekeyedShares]
    ) -> dict[int, MaskedInputRequest]:
        """Stage 1 -> 3 of a round keyed in advance: keep valid replies, route the bundles.

        Each advertisement must name its sender's pre-key; the bundles of a client
        sealed to every holder it drew, and only the live holders' are routed. Each
        masked-input request carries the advertisements of the recipient's partners.
        """
        self._expect(ServerStage.KEYS)
        if not self._prekeys:
            raise InvalidMessage("this round was not keyed in advance")
        adverts: dict[int, KeyAdvertisement] = {}
        for node, reply in replies.items():
            prekey = self._prekeys.get(node)
            if prekey is None:
                continue
            advert = reply.advert
            if (advert.enc_public, advert.mask_public) != (prekey.enc_public, prekey.mask_public):
                self._exclude(node, "prekeyed-setup: keys other than its announced pre-key")
                continue
            adverts[node] = advert
        self.receive_adverts(adverts)
        live = set(self._neighbours)
        shares = {}
        for node in live:
            message = replies[node].shares
            if set(message.ciphertexts) == set(self._holders(node)):
                routed = {h: c for h, c in message.ciphertexts.items() if h in live}
                message = EncryptedShares(node_id=message.node_id, ciphertexts=routed)
            shares[node] = message
        requests = self.receive_shares(shares)
        return {
            node: replace(request, adverts=tuple(self._adverts[p] for p in self._partners[node]))
            for node, request in requests.items()
        }

    def graph_setups(self, prekeys: Mapping[int, PreKey]) -> dict[int, GraphSetup]:
        """Stages 0-3 of a round on a server-drawn graph: setup, pre-keys, holders, drawn-by.

        Each client learns the holders drawn for it and the clients whose holders
        include it (its neighbours are both), and answers with its advertisement,
        its sealed shares and its masked input at once (:meth:`receive_graph`).
        """
        if not self._assigned:
            raise InvalidMessage("this round's holders are drawn by the clients")
        keyed = self.prekeyed_setups(prekeys)
        drawn_by: dict[int, list[int]] = {n: [] for n in self._participants}
        for node, holders in self._assigned.items():
            for holder in holders:
                drawn_by[holder].append(node)
        return {
            node: GraphSetup(
                request.setup, request.prekeys, self._assigned[node], tuple(sorted(drawn_by[node]))
            )
            for node, request in keyed.items()
        }

    def receive_graph(
        self, replies: Mapping[int, tuple[PrekeyedShares, MaskedInput]]
    ) -> dict[int, UnmaskRequest]:
        """Stages 1-3 -> 5 of a round on a server-drawn graph: keys, shares and masked inputs.

        A client whose advertisement names other keys than its pre-key or other
        holders than drawn, or whose bundles do not cover all its holders, is
        left out, and so is every client left with fewer than t live holders.
        Every client masked with all its neighbours, answering or not: each
        unmask request carries the survivor set and the bundles addressed to the
        recipient; the masks of the clients outside the sum are removed with the
        seeds their surviving partners reveal (or their rebuilt keys).
        """
        self._expect(ServerStage.KEYS)
        if not self._assigned:
            raise InvalidMessage("this round's holders are drawn by the clients")
        kept: dict[int, PrekeyedShares] = {}
        for node, (reply, _) in replies.items():
            if node in self._assigned and reply.advert.holders != self._assigned[node]:
                self._exclude(node, "keyed-masked-input: holders other than the server drew")
                continue
            kept[node] = reply
        requests = self.receive_prekeyed(kept)
        # Every client masked with its whole neighbourhood in the drawn graph.
        everyone = set(self._participants)
        graph = neighbours_of(self._assigned, everyone)
        for node in self._shared:
            self._partners[node] = graph[node]
        inputs = {
            node: replace(masked, rejected=())
            for node, (_, masked) in replies.items()
            if node in self._shared
        }
        survivors = self.receive_masked(inputs)
        return {
            node: replace(request, ciphertexts=requests[node].ciphertexts)
            for node, request in survivors.items()
            if isinstance(request, UnmaskRequest)
        }

    def _advert_problem(self, node: int, advert: KeyAdvertisement) -> str | None:
        if advert.node_id != node:
            return "advertisement for another node"
        if advert.setup_digest != self._digest:
            return "advertisement for another round setup"
        holders = advert.holders
        if len(holders) != self._degree or node in holders:
            return "invalid holders"
        if not set(holders) <= set(self._participants):
            return "holders outside the round"
        lengths = (
            len(advert.enc_public),
            len(advert.mask_public),
            len(advert.self_mask_commitment),
        )
        if lengths != (KEY_BYTES, KEY_BYTES, 32):
            return "malformed keys"
        if self._threat is ThreatModel.ACTIVE:
            if advert.certificate is None or advert.signature is None:
                return "unsigned advertisement"
            assert self._authority is not None
            try:
                advert.certificate.verify(self._authority)
                verify_signature(
                    advert.certificate.public_key,
                    advert.signature,
                    advert_message(self._round_id, advert),
                )
            except CryptoError:
                return "invalid certificate or signature"
        return None

    def receive_adverts(
        self, adverts: Mapping[int, KeyAdvertisement]
    ) -> dict[int, ShareKeysRequest]:
        """Stage 1 -> 2: keep valid advertisements, relay each client its neighbours' ones."""
        self._expect(ServerStage.KEYS)
        enrolled: dict[str, int] = {}
        members = set(self._participants)
        for node, advert in adverts.items():
            if node not in members:
                continue
            problem = self._advert_problem(node, advert)
            if problem is not None:
                self._exclude(node, f"advertise-keys: {problem}")
                continue
            if advert.certificate is not None:
                other = enrolled.setdefault(advert.certificate.enrolment_id, node)
                if other != node:
                    self._exclude(node, "advertise-keys: device enrolled twice in the round")
                    continue
            self._adverts[node] = advert
        live = self._prune(set(self._adverts), "advertise-keys")
        self._neighbours = neighbours_of({n: self._holders(n) for n in live}, live)
        self._stage = ServerStage.SHARES
        return {
            node: ShareKeysRequest(tuple(self._adverts[m] for m in self._neighbours[node]))
            for node in live
        }

    def receive_shares(
        self, shares: Mapping[int, EncryptedShares]
    ) -> dict[int, MaskedInputRequest]:
        """Stage 2 -> 3: check each client shared with every live holder; route the bundles."""
        self._expect(ServerStage.SHARES)
        live = set(self._neighbours)
        for node, message in shares.items():
            if node not in live:
                continue
            expected = live.intersection(self._holders(node))
            if message.node_id != node:
                self._exclude(node, "share-keys: shares for another node")
            elif set(message.ciphertexts) != expected:
                missing = sorted(expected - set(message.ciphertexts))
                self._exclude(node, f"share-keys: no shares for live holders {missing[:5]}")
            else:
                self._shared.add(node)
        self._shared = self._prune(self._shared, "share-keys")
        requests = {}
        for node in self._shared:
            partners = tuple(p for p in self._neighbours[node] if p in self._shared)
            self._partners[node] = partners
            inbox = {
                sender: shares[sender].ciphertexts[node]
                for sender in partners
                if node in self._holders(sender)
            }
            requests[node] = MaskedInputRequest(partners, inbox)
        self._stage = ServerStage.MASKED
        return requests

    def _masked_with(self, node: int) -> set[int]:
        return set(self._partners[node]) - self._rejected[node]

    def receive_masked(
        self, inputs: Mapping[int, MaskedInput]
    ) -> dict[int, ConsistencyRequest] | dict[int, UnmaskRequest]:
        """Stage 3 -> 4 (or 5): keep well-formed masked inputs, drop rejected senders."""
        self._expect(ServerStage.MASKED)
        accused: dict[int, int] = {}
        for node, message in inputs.items():
            if node not in self._shared:
                continue
            vector = message.vector
            senders = {p for p in self._partners[node] if node in self._holders(p)}
            if message.node_id != node:
                self._exclude(node, "masked-input: input for another node")
            elif vector.dtype != self._encoding.dtype or vector.shape != (self._length,):
                self._exclude(node, "masked-input: masked input of the wrong type or length")
            elif not set(message.rejected) <= senders:
                self._exclude(node, "masked-input: rejects clients that sent it nothing")
            else:
                self._masked[node] = vector
                self._rejected[node] = frozenset(message.rejected)
                for sender in message.rejected:
                    accused.setdefault(sender, node)
        for sender, reporter in sorted(accused.items()):
            self._exclude(sender, f"share-keys: its shares did not open at node {reporter}")
        survivors = self._prune(set(self._masked) - set(accused), "masked-input")
        self._survivors = tuple(sorted(survivors))
        total = np.zeros(self._length, dtype=self._encoding.dtype)
        for node in self._survivors:
            np.add(total, self._masked[node], out=total)
        self._masked_sum = total
        self._masked.clear()
        if self._threat is ThreatModel.ACTIVE:
            self._stage = ServerStage.CONFIRMED
            return {node: ConsistencyRequest(self._survivors) for node in self._survivors}
        self._stage = ServerStage.DONE
        return {node: UnmaskRequest(self._survivors, {}) for node in self._survivors}

    @property
    def survivors(self) -> tuple[int, ...]:
        """The clients whose masked inputs are in the sum (known after the masked inputs)."""
        return self._survivors

    def receive_signatures(
        self, signatures: Mapping[int, ConsistencySignature]
    ) -> dict[int, UnmaskRequest]:
        """Stage 4 -> 5 (active model): forward the valid signatures on the survivor set."""
        self._expect(ServerStage.CONFIRMED)
        message = survivors_message(self._round_id, self._survivors)
        members = set(self._survivors)
        for node, reply in signatures.items():
            advert = self._adverts.get(node)
            if node not in members or reply.node_id != node or advert is None:
                self._exclude(node, "consistency: signature from a non-survivor")
                continue
            assert advert.certificate is not None
            try:
                verify_signature(advert.certificate.public_key, reply.signature, message)
            except CryptoError:
                self._exclude(node, "consistency: invalid signature")
                continue
            self._signatures[node] = reply.signature
        self._stage = ServerStage.DONE
        return {
            node: UnmaskRequest(self._survivors, dict(self._signatures))
            for node in self._signatures
        }

    def _reconstruct(
        self,
        owner: int,
        shares: dict[int, npt.NDArray[np.uint32]],
        verify: Callable[[bytes], bool],
    ) -> bytes:
        order = self._holders(owner)
        holders = sorted(shares)
        if len(holders) < self._threshold:
            raise ProtocolAbort(
                "unmask", [owner], f"{len(holders)} shares of {owner}, threshold {self._threshold}"
            )
        for tries, subset in enumerate(itertools.combinations(holders, self._threshold)):
            if tries >= _MAX_RECONSTRUCTION_TRIES:
                break
            xs = [order.index(h) + 1 for h in subset]
            secrets = combine(xs, np.stack([shares[h] for h in subset]), num_secrets=1)
            if secrets is not None and verify(secrets[0]):
                return secrets[0]
        raise ProtocolAbort("unmask", [owner], "no set of shares matches the commitment")

    def _collect_shares(
        self, responses: Mapping[int, UnmaskResponse], survivors: set[int], dropped: set[int]
    ) -> tuple[
        dict[int, dict[int, npt.NDArray[np.uint32]]],
        dict[int, dict[int, npt.NDArray[np.uint32]]],
        dict[int, dict[int, bytes]],
        dict[tuple[int, int], dict[int, npt.NDArray[np.uint32]]],
    ]:
        self_shares: dict[int, dict[int, npt.NDArray[np.uint32]]] = {n: {} for n in survivors}
        key_shares: dict[int, dict[int, npt.NDArray[np.uint32]]] = {n: {} for n in dropped}
        seeds: dict[int, dict[int, bytes]] = {n: {} for n in dropped}
        # (survivor, partner outside the sum) -> holder -> share of their pairwise seed.
        pair_shares: dict[tuple[int, int], dict[int, npt.NDArray[np.uint32]]] = {}
        for holder, response in responses.items():
            problem = self._response_problem(holder, response, survivors, dropped)
            if problem is not None:
                self._exclude(holder, f"unmask: {problem}")
                continue
            pairs = response.pair_seed_shares
            for owner, by_partner in pairs.items():
                for partner, share in by_partner.items():
                    if _well_formed(share):
                        pair_shares.setdefault((owner, partner), {})[holder] = share
            for partner, seed in response.pairwise_seeds.items():
                seeds[partner][holder] = seed
            for owner, share in response.self_mask_shares.items():
                if _well_formed(share):
                    self_shares[owner][holder] = share
            for owner, share in response.mask_key_shares.items():
                if _well_formed(share):
                    key_shares[owner][holder] = share
        return self_shares, key_shares, seeds, pair_shares

    def _response_problem(
        self, holder: int, response: UnmaskResponse, survivors: set[int], dropped: set[int]
    ) -> str | None:
        """Return why a holder's unmask response must be left out, or None."""
        if holder not in survivors or response.node_id != holder:
            return "response from a non-survivor"
        owners_self, owners_key = set(response.self_mask_shares), set(response.mask_key_shares)
        if owners_self & owners_key or not owners_self <= survivors or not owners_key <= dropped:
            return "malformed response"
        if any(holder not in self._holders(o) for o in owners_self | owners_key):
            return "shares it was never sent"
        if not set(response.pairwise_seeds) <= dropped & self._masked_with(holder):
            return "seeds of clients it did not mask with"
        if not self._may_reveal_pairs(response.pair_seed_shares, owners_self, dropped):
            return "pairwise-seed shares it may not reveal"
        return None

    def _may_reveal_pairs(
        self,
        pairs: Mapping[int, Mapping[int, npt.NDArray[np.uint32]]],
        owners_self: set[int],
        dropped: set[int],
    ) -> bool:
        """Whether a holder's pairwise-seed shares are all of survivors' seeds with the dropped."""
        if not pairs:
            return True
        return (
            bool(self._assigned)
            and set(pairs) <= owners_self
            and all(set(pairs[o]) <= dropped & self._masked_with(o) for o in pairs)
        )

    def _self_seed_check(self, owner: int) -> Callable[[bytes], bool]:
        commitment = self._adverts[owner].self_mask_commitment

        def matches(seed: bytes) -> bool:
            return self_mask_commitment(self._round_id, owner, seed) == commitment

        return matches

    def _dropped_masks(
        self,
        owner: int,
        partners: list[int],
        key_shares: dict[int, npt.NDArray[np.uint32]],
        revealed: dict[int, bytes],
        pair_shares: Mapping[tuple[int, int], dict[int, npt.NDArray[np.uint32]]],
    ) -> list[tuple[bytes, bool]]:
        """Return how to undo the masks a dropped client shares with surviving partners.

        From its rebuilt masking key when t of its holders sent usable key
        shares; else from the seeds the partners revealed (its own bundles were
        bad, or on a server-drawn graph it never answered), a silent partner's
        seed rebuilt from its holders' pairwise-seed shares; else the sum cannot
        be exact.
        """
        private = self._rebuilt_key(owner, key_shares)
        if private is not None:
            seeds = {
                partner: pairwise_mask_seed(
                    private,
                    self._adverts[partner].mask_public,
                    round_id=self._round_id,
                    node=owner,
                    peer=partner,
                )
                for partner in partners
            }
        else:
            seeds = {}
            for partner in partners:
                shares = pair_shares.get((partner, owner), {})
                if partner in revealed:
                    seeds[partner] = revealed[partner]
                elif len(shares) >= self._threshold:
                    # Only a server-drawn graph's (semi-honest) holders send these: no
                    # commitment to check the seed against.
                    seeds[partner] = self._reconstruct(partner, shares, lambda _: True)
                else:
                    raise ProtocolAbort(
                        "unmask",
                        [owner],
                        "neither its key nor its partners' seeds remove its masks",
                    )
        # Undo what each surviving partner did with the mask.
        return [(seeds[p], adds_pairwise_mask(p, owner)) for p in partners]

    def _rebuilt_key(
        self, owner: int, key_shares: dict[int, npt.NDArray[np.uint32]]
    ) -> bytes | None:
        """Return a dropped client's masking key from its holders' shares, or None if it cannot be.

        None when it never answered (a server-drawn graph: nobody holds its key)
        or fewer than t usable shares match its advertised key.
        """
        if owner not in self._adverts:
            return None
        try:
            return self._reconstruct(owner, key_shares, self._mask_key_check(owner))
        except ProtocolAbort:
            return None

    def _mask_key_check(self, owner: int) -> Callable[[bytes], bool]:
        public = self._adverts[owner].mask_public
        return lambda private: _derives(private, public)

    def finish(self, responses: Mapping[int, UnmaskResponse]) -> UnmaskResult:
        """Stage 5: reconstruct seeds and keys, remove every mask, return the exact sum."""
        if self._stage is not ServerStage.DONE:
            raise InvalidMessage(f"out of order: cannot finish at {self._stage.value}")
        survivors = set(self._survivors)
        # On a server-drawn graph the survivors also masked with clients that never answered.
        dropped = (set(self._participants) if self._assigned else self._shared) - survivors
        self_shares, key_shares, revealed, pair_shares = self._collect_shares(
            responses, survivors, dropped
        )
        assert self._masked_sum is not None  # set with the survivors
        total = self._masked_sum.copy()
        masks: list[tuple[bytes, bool]] = []
        for owner in sorted(survivors):
            seed = self._reconstruct(owner, self_shares[owner], self._self_seed_check(owner))
            masks.append((seed, True))
        for owner in sorted(dropped):
            partners = [p for p in sorted(survivors) if owner in self._masked_with(p)]
            if partners:
                masks.extend(
                    self._dropped_masks(
                        owner, partners, key_shares[owner], revealed[owner], pair_shares
                    )
                )
        # Every seed is in hand (self-mask seeds and rebuilt keys verified against their
        # commitments) before any mask is removed: one fused pass.
        apply_masks(total, masks)
        if self._encoding.ring_bits < total.dtype.itemsize * 8:
            np.bitwise_and(total, total.dtype.type(self._encoding.ring_mask), out=total)
        return UnmaskResult(
            total=total,
            survivors=self._survivors,
            dropped=tuple(sorted(dropped)),
            excluded=tuple(sorted(self.excluded)),
        )


def _well_formed(share: npt.NDArray[np.uint32]) -> bool:
    return share.shape == (CHUNKS_PER_SECRET,) and bool(np.all(share < PRIME))


def _derives(private: bytes, public: bytes) -> bool:
    try:
        return public_key_of(private) == public
    except (CryptoError, ValueError):
        return False
