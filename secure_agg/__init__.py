"""SecAgg+ maths and protocol state machines; pure: stdlib, numpy and cryptography only.

Built so far: the primitives (AES-CTR mask expansion, X25519 + HKDF pairwise keys,
ChaCha20-Poly1305 share encryption, Ed25519 identities, vectorised Shamir sharing
over GF(2^31 - 1), holders each client draws itself, k/t selection, quantisation
with exact integer weighting and conditional rounding, seedable CSPRNG sources), the
device's :class:`ProtocolPolicy`, and the protocol state machines:
:class:`ClientSession` and :class:`ServerSession` (dropout recovery at every stage,
signed key advertisements and the consistency check in the active model), their
strict binary wire format (:mod:`secure_agg.wire`, :mod:`secure_agg.envelope`),
fused mask application (:func:`apply_masks`) and the discrete Gaussian sampler of
distributed DP (:func:`discrete_gaussian`).
"""

from secure_agg.client import ClientSession
from secure_agg.crypto import AgreementKeyPair, KeyPurpose, derive_pair_key, open_sealed, seal
from secure_agg.encoding import EncodingConfig, decode_sum, encode
from secure_agg.errors import CryptoError, InvalidMessage, PolicyViolation, ProtocolAbort
from secure_agg.graph import choose_holders
from secure_agg.identity import EnrolmentAuthority, IdentityCertificate, NodeIdentity
from secure_agg.noise import discrete_gaussian
from secure_agg.params import NeighbourhoodParams, ThreatModel, choose_neighbourhood
from secure_agg.policy import ProtocolPolicy
from secure_agg.prg import add_mask, apply_masks, expand_mask, uniform_floats
from secure_agg.randomness import DeterministicRandom, RandomSource, SystemRandomSource
from secure_agg.server import ServerSession, UnmaskResult
from secure_agg.shamir import combine, split

__all__ = [
    "AgreementKeyPair",
    "ClientSession",
    "CryptoError",
    "DeterministicRandom",
    "EncodingConfig",
    "EnrolmentAuthority",
    "IdentityCertificate",
    "InvalidMessage",
    "KeyPurpose",
    "NeighbourhoodParams",
    "NodeIdentity",
    "PolicyViolation",
    "ProtocolAbort",
    "ProtocolPolicy",
    "RandomSource",
    "ServerSession",
    "SystemRandomSource",
    "ThreatModel",
    "UnmaskResult",
    "add_mask",
    "apply_masks",
    "choose_holders",
    "choose_neighbourhood",
    "combine",
    "decode_sum",
    "derive_pair_key",
    "discrete_gaussian",
    "encode",
    "expand_mask",
    "open_sealed",
    "seal",
    "split",
    "uniform_floats",
]
