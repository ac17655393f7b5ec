"""Keys announced in advance: one fresh key pair per participation, for a shorter round.

A device announces the public keys of its *next* participation with the last
reply of the current one (or when the server asks, :class:`PreKeyRequest`), and
keeps the private halves (:class:`PendingPreKey`) until that participation
starts. The server then sends a round's setup together with every participant's
pre-key, and each client draws its holders and seals its shares to their
pre-keys in the same reply as its advertisement: the classic round's two first
trips (advertise keys, share keys) become one.

Notes
-----
What holds, and why (the full argument is in ``docs/threat-model.md``):

- *One use.* A device consumes its pending key when a round names it (whether
  the round then completes or not) and never uses it again: the server cannot
  replay a pre-key into a second round, and each round's masks and share keys
  still come from keys used for that round alone. Every derived key and sealed
  bundle is bound to the round id, so shares sealed to a pre-key in a round the
  device never joined are useless in any other.
- *Authenticity.* In the active model a pre-key is signed by the device's
  enrolment identity and checked, like an advertisement, against the pinned
  authority, the device's own clock and its own revocation list: a server that
  substituted its own keys would open the shares sealed to them.
- *Exposure.* A pending key sits on the device between participations: taking a
  device's state then reveals one future round's keys (what taking it during that
  round would), nothing of past rounds (their keys are gone). ``max_age`` bounds
  how long a key may wait; an older one is discarded and the device is asked
  for a fresh one.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, replace
from typing import Final

from secure_agg.crypto import KEY_BYTES, AgreementKeyPair, public_key_of, verify_signature
from secure_agg.errors import CryptoError, InvalidMessage
from secure_agg.identity import NodeIdentity
from secure_agg.messages import PreKey, prekey_message
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from secure_agg.randomness import RandomSource
from secure_agg.wire import Reader, Writer

__all__ = ["PendingPreKey", "check_prekey", "prekey_problem"]

_STATE_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class PendingPreKey:
    """The private side of a device's announced pre-key, kept on the device until used.

    Parameters
    ----------
    node_id
        The node the key was announced for.
    enc, mask
        The share-encryption and masking key pairs of the next participation.
    created_at
        The device's clock (Unix seconds) when the key was made.
    """

    node_id: int
    enc: AgreementKeyPair
    mask: AgreementKeyPair
    created_at: int

    @classmethod
    def generate(cls, node_id: int, rng: RandomSource, *, now: int) -> PendingPreKey:
        """Draw a fresh pair of key pairs from ``rng``."""
        return cls(
            node_id=node_id,
            enc=AgreementKeyPair.generate(rng),
            mask=AgreementKeyPair.generate(rng),
            created_at=now,
        )

    def announce(self, identity: NodeIdentity | None) -> PreKey:
        """Return the public pre-key, signed by ``identity`` when there is one."""
        prekey = PreKey(
            node_id=self.node_id, enc_public=self.enc.public, mask_public=self.mask.public
        )
        if identity is None:
            return prekey
        return replace(
            prekey,
            certificate=identity.certificate,
            signature=identity.sign(prekey_message(prekey)),
        )

    def to_bytes(self) -> bytes:
        """Return the key's state (private halves included: keep it on the device)."""
        w = Writer()
        w.u8(_STATE_VERSION)
        w.u64(self.node_id)
        for pair in (self.enc, self.mask):
            w.fixed(pair.private, KEY_BYTES)
        w.u64(self.created_at)
        return w.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PendingPreKey:
        """Parse :meth:`to_bytes`' output; the public halves are recomputed, not trusted.

        Raises
        ------
        InvalidMessage
            If the bytes are not a pending key's state.
        """
        r = Reader(data)
        if r.u8() != _STATE_VERSION:
            raise InvalidMessage("unsupported pre-key state version")
        node_id = r.u64()
        enc_private, mask_private = r.fixed(KEY_BYTES), r.fixed(KEY_BYTES)
        created_at = r.u64()
        r.finish()
        try:
            enc = AgreementKeyPair(private=enc_private, public=public_key_of(enc_private))
            mask = AgreementKeyPair(private=mask_private, public=public_key_of(mask_private))
        except (CryptoError, ValueError) as exc:
            raise InvalidMessage("damaged pre-key state") from exc
        return cls(node_id=node_id, enc=enc, mask=mask, created_at=created_at)


def prekey_problem(
    prekey: PreKey, *, node_id: int, threat_model: ThreatModel, authority: bytes | None
) -> str | None:
    """Return why the server must not keep ``prekey`` from ``node_id``, or None if it may.

    The server's own check on arrival (a bad pre-key is never stored or relayed):
    the node, the key sizes and, in the active model, the certificate under the
    enrolment authority and the signature.
    """
    if prekey.node_id != node_id:
        return "pre-key for another node"
    if len(prekey.enc_public) != KEY_BYTES or len(prekey.mask_public) != KEY_BYTES:
        return "malformed pre-key"
    if threat_model is ThreatModel.ACTIVE:
        if prekey.certificate is None or prekey.signature is None or authority is None:
            return "unsigned pre-key"
        try:
            prekey.certificate.verify(authority)
            verify_signature(
                prekey.certificate.public_key, prekey.signature, prekey_message(prekey)
            )
        except CryptoError:
            return "invalid certificate or signature on the pre-key"
    return None


def check_prekey(
    prekey: PreKey, *, policy: ProtocolPolicy, now: int | None, revoked: Set[str]
) -> None:
    """Refuse a neighbour's pre-key the device cannot seal its shares to.

    Raises
    ------
    InvalidMessage
        If the keys are malformed.
    CryptoError
        In the active model, opaquely, if the certificate is missing, forged,
        expired on the device's own clock or revoked on its own list, or the
        signature does not verify.
    """
    if len(prekey.enc_public) != KEY_BYTES or len(prekey.mask_public) != KEY_BYTES:
        raise InvalidMessage(f"the pre-key of node {prekey.node_id} is malformed")
    if policy.threat_model is ThreatModel.ACTIVE:
        if prekey.certificate is None or prekey.signature is None:
            raise CryptoError
        policy.check_certificate(prekey.certificate, now=now, revoked=revoked)
        verify_signature(prekey.certificate.public_key, prekey.signature, prekey_message(prekey))
