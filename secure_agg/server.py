"""The server side of a SecAgg+ round as a state machine.

One :class:`ServerSession` per round: it builds the neighbour graph, relays
keys and sealed shares, collects masked inputs and shares, and finally removes
every mask to obtain the exact modular sum of the survivors' encoded inputs and
nothing else. A client that sends a malformed or unverifiable message at any
stage is treated as dropped at that stage; the round aborts only when some
survivor no longer has ``threshold`` live neighbours.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import numpy.typing as npt

from secure_agg.crypto import public_key_of, verify_signature
from secure_agg.encoding import EncodingConfig
from secure_agg.errors import CryptoError, InvalidMessage, ProtocolAbort
from secure_agg.graph import harary_neighbours
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
        The node ids sampled for the round.
    degree, threshold
        k and t (see :func:`secure_agg.params.choose_neighbourhood`).
    encoding
        The ring and quantisation every client uses.
    vector_length
        Encoded length (model size + 1 for the weight).
    threat_model
        Whether signatures and the consistency check are required.
    rng
        Source of the round id and the graph.
    authority_public_key
        The enrolment authority's key (active model).
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
    ) -> None:
        if len(participants) > encoding.max_clients:
            raise InvalidMessage(
                f"{len(participants)} participants but the encoding allows {encoding.max_clients}"
            )
        if threat_model is ThreatModel.ACTIVE and authority_public_key is None:
            raise InvalidMessage("the active model needs the enrolment authority's key")
        self._round_id = rng.random_bytes(_ROUND_ID_BYTES)
        self._graph = harary_neighbours(list(participants), degree, rng)
        degree_used = len(next(iter(self._graph.values())))
        if not 1 <= threshold <= degree_used:
            raise InvalidMessage(f"threshold {threshold} outside [1, {degree_used}]")
        self._threshold = threshold
        self._encoding = encoding
        self._length = vector_length
        self._threat = threat_model
        self._authority = authority_public_key
        self._stage = ServerStage.SETUP
        self._adverts: dict[int, KeyAdvertisement] = {}
        self._shared: set[int] = set()
        self._masked: dict[int, npt.NDArray[np.unsignedinteger[Any]]] = {}
        self._survivors: tuple[int, ...] = ()
        self._signatures: dict[int, bytes] = {}
        self.excluded: set[int] = set()

    @property
    def round_id(self) -> bytes:
        """The random id every key, share and signature of the round is bound to."""
        return self._round_id

    @property
    def neighbours(self) -> Mapping[int, tuple[int, ...]]:
        """Each participant's neighbours."""
        return self._graph

    def _expect(self, stage: ServerStage) -> None:
        if self._stage is not stage:
            raise InvalidMessage(f"out of order: expected {stage.value}, at {self._stage.value}")

    def _exclude(self, node: int, reason: str) -> None:
        logger.warning("secure aggregation: excluding node %d: %s", node, reason)
        self.excluded.add(node)

    def _require_live_neighbours(self, live: set[int], stage: str) -> None:
        starved = [n for n in live if len(live.intersection(self._graph[n])) < self._threshold]
        if starved:
            raise ProtocolAbort(stage, starved, f"fewer than {self._threshold} live neighbours")

    def setups(self) -> dict[int, RoundSetup]:
        """Stage 0: the setup message of every participant."""
        self._expect(ServerStage.SETUP)
        self._stage = ServerStage.KEYS
        return {
            node: RoundSetup(
                round_id=self._round_id,
                node_id=node,
                neighbours=neighbours,
                threshold=self._threshold,
                encoding=self._encoding,
                vector_length=self._length,
                threat_model=self._threat,
                authority_public_key=self._authority,
            )
            for node, neighbours in self._graph.items()
        }

    def _valid_advert(self, node: int, advert: KeyAdvertisement) -> bool:
        if advert.node_id != node or node not in self._graph:
            return False
        if len(advert.enc_public) != 32 or len(advert.mask_public) != 32:
            return False
        if len(advert.self_mask_commitment) != 32:
            return False
        if self._threat is ThreatModel.ACTIVE:
            if advert.certificate is None or advert.signature is None:
                return False
            assert self._authority is not None
            try:
                advert.certificate.verify(self._authority)
                verify_signature(
                    advert.certificate.public_key,
                    advert.signature,
                    advert_message(self._round_id, advert),
                )
            except CryptoError:
                return False
        return True

    def receive_adverts(
        self, adverts: Mapping[int, KeyAdvertisement]
    ) -> dict[int, ShareKeysRequest]:
        """Stage 1 -> 2: keep valid advertisements, relay each node its neighbours' ones."""
        self._expect(ServerStage.KEYS)
        enrolled: dict[str, int] = {}
        for node, advert in adverts.items():
            if not self._valid_advert(node, advert):
                self._exclude(node, "invalid key advertisement")
                continue
            if advert.certificate is not None:
                other = enrolled.setdefault(advert.certificate.enrolment_id, node)
                if other != node:
                    self._exclude(node, "device enrolled twice in the round")
                    continue
            self._adverts[node] = advert
        live = set(self._adverts)
        self._require_live_neighbours(live, "advertise-keys")
        self._stage = ServerStage.SHARES
        return {
            node: ShareKeysRequest(tuple(self._adverts[m] for m in self._graph[node] if m in live))
            for node in live
        }

    def receive_shares(
        self, shares: Mapping[int, EncryptedShares]
    ) -> dict[int, MaskedInputRequest]:
        """Stage 2 -> 3: route each sealed bundle to its recipient."""
        self._expect(ServerStage.SHARES)
        inbox: dict[int, dict[int, bytes]] = {node: {} for node in self._adverts}
        for node, message in shares.items():
            allowed = set(self._graph.get(node, ())) & set(self._adverts)
            if node not in self._adverts or message.node_id != node:
                self._exclude(node, "shares from a node that did not advertise")
                continue
            if not set(message.ciphertexts) <= allowed:
                self._exclude(node, "shares addressed to non-neighbours")
                continue
            self._shared.add(node)
        for node in self._shared:
            for recipient, sealed in shares[node].ciphertexts.items():
                inbox[recipient][node] = sealed
        self._require_live_neighbours(self._shared, "share-keys")
        self._stage = ServerStage.MASKED
        return {
            node: MaskedInputRequest({s: c for s, c in inbox[node].items() if s in self._shared})
            for node in self._shared
        }

    def receive_masked(
        self, inputs: Mapping[int, MaskedInput]
    ) -> dict[int, ConsistencyRequest] | dict[int, UnmaskRequest]:
        """Stage 3 -> 4 (or 5): keep well-formed masked inputs; announce the survivors."""
        self._expect(ServerStage.MASKED)
        for node, message in inputs.items():
            vector = message.vector
            if node not in self._shared or message.node_id != node:
                self._exclude(node, "masked input from a node that did not share keys")
            elif vector.dtype != self._encoding.dtype or vector.shape != (self._length,):
                self._exclude(node, "masked input of the wrong type or length")
            else:
                self._masked[node] = vector
        if not self._masked:
            raise ProtocolAbort("masked-input", self._shared, "no masked input arrived")
        # Each survivor's self-mask seed needs threshold shares from survivors: fail now,
        # before asking anyone to reveal anything, if some survivor cannot get them.
        self._require_live_neighbours(set(self._masked), "masked-input")
        self._survivors = tuple(sorted(self._masked))
        if self._threat is ThreatModel.ACTIVE:
            self._stage = ServerStage.CONFIRMED
            return {node: ConsistencyRequest(self._survivors) for node in self._survivors}
        self._stage = ServerStage.DONE
        return {node: UnmaskRequest(self._survivors, {}) for node in self._survivors}

    def receive_signatures(
        self, signatures: Mapping[int, ConsistencySignature]
    ) -> dict[int, UnmaskRequest]:
        """Stage 4 -> 5 (active model): forward the valid signatures on the survivor set."""
        self._expect(ServerStage.CONFIRMED)
        message = survivors_message(self._round_id, self._survivors)
        for node, reply in signatures.items():
            advert = self._adverts.get(node)
            if node not in self._masked or reply.node_id != node or advert is None:
                self._exclude(node, "consistency signature from a non-survivor")
                continue
            assert advert.certificate is not None
            try:
                verify_signature(advert.certificate.public_key, reply.signature, message)
            except CryptoError:
                self._exclude(node, "invalid consistency signature")
                continue
            self._signatures[node] = reply.signature
        self._stage = ServerStage.DONE
        return {
            node: UnmaskRequest(self._survivors, dict(self._signatures))
            for node in self._signatures
        }

    def _reconstruct(
        self, owner: int, shares: dict[int, npt.NDArray[np.uint32]], verify: Any
    ) -> bytes:
        order = self._graph[owner]
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
        dict[int, dict[int, npt.NDArray[np.uint32]]], dict[int, dict[int, npt.NDArray[np.uint32]]]
    ]:
        self_shares: dict[int, dict[int, npt.NDArray[np.uint32]]] = {n: {} for n in survivors}
        key_shares: dict[int, dict[int, npt.NDArray[np.uint32]]] = {n: {} for n in dropped}
        for holder, response in responses.items():
            if holder not in survivors or response.node_id != holder:
                self._exclude(holder, "unmask response from a non-survivor")
                continue
            claimed = set(response.self_mask_shares) | set(response.mask_key_shares)
            if set(response.self_mask_shares) & set(response.mask_key_shares) or not claimed <= set(
                self._graph[holder]
            ):
                self._exclude(holder, "malformed unmask response")
                continue
            for owner, share in response.self_mask_shares.items():
                if owner in survivors and _well_formed(share):
                    self_shares[owner][holder] = share
            for owner, share in response.mask_key_shares.items():
                if owner in dropped and _well_formed(share):
                    key_shares[owner][holder] = share
        return self_shares, key_shares

    def finish(self, responses: Mapping[int, UnmaskResponse]) -> UnmaskResult:
        """Stage 5: reconstruct seeds and keys, remove every mask, return the exact sum."""
        if self._stage is not ServerStage.DONE:
            raise InvalidMessage(f"out of order: cannot finish at {self._stage.value}")
        survivors = set(self._survivors)
        dropped = self._shared - survivors
        self_shares, key_shares = self._collect_shares(responses, survivors, dropped)
        total = np.zeros(self._length, dtype=self._encoding.dtype)
        for vector in self._masked.values():
            np.add(total, vector, out=total)
        masks: list[tuple[bytes, bool]] = []
        for owner in sorted(survivors):
            commitment = self._adverts[owner].self_mask_commitment
            seed = self._reconstruct(
                owner,
                self_shares[owner],
                lambda s, o=owner, c=commitment: self_mask_commitment(self._round_id, o, s) == c,
            )
            masks.append((seed, True))
        for owner in sorted(dropped):
            partners = [p for p in self._graph[owner] if p in survivors]
            if not partners:
                continue
            public = self._adverts[owner].mask_public
            private = self._reconstruct(
                owner, key_shares[owner], lambda s, p=public: _derives(s, p)
            )
            for partner in partners:
                seed = pairwise_mask_seed(
                    private,
                    self._adverts[partner].mask_public,
                    round_id=self._round_id,
                    node=owner,
                    peer=partner,
                )
                # Undo what the surviving partner did with this mask.
                masks.append((seed, adds_pairwise_mask(partner, owner)))
        # Every seed is verified before any mask is removed: one fused pass.
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
