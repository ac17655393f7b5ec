"""The envelope both transport adapters put around a stage message: stage, round, payload.

Kept here, free of any transport library, so the server's and the client's
adapters (which may not import each other) agree on one format. Flower
adapters store the three fields in one ConfigRecord under :data:`RECORD_KEY`
and ship masked vectors in an ArrayRecord under :data:`VECTOR_RECORD_KEY`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Final

from secure_agg.errors import InvalidMessage

__all__ = [
    "PREKEY_FIELD",
    "PREKEY_RECORD_KEY",
    "RECORD_KEY",
    "VECTOR_KEY",
    "VECTOR_RECORD_KEY",
    "Envelope",
    "Stage",
]

RECORD_KEY: Final = "fedge.secagg"
VECTOR_RECORD_KEY: Final = "fedge.secagg.vector"
VECTOR_KEY: Final = "masked"
# A device's last reply of a round may carry its next pre-key (wire-encoded) under this key.
PREKEY_RECORD_KEY: Final = "fedge.secagg.prekey"
PREKEY_FIELD: Final = "prekey"

_STAGE: Final = "stage"
_ROUND: Final = "round-id"
_PAYLOAD: Final = "payload"
_MAX_PAYLOAD: Final = 1 << 26


class Stage(Enum):
    """The round trips of a secure round; requests and replies share the stage name."""

    PREKEY = "prekey"  # request: PreKeyRequest; reply: PreKey
    SETUP = "setup"  # request: RoundSetup; reply: KeyAdvertisement
    # Keys announced in advance: setup and share keys in one trip.
    PREKEYED = "prekeyed-setup"  # request: PrekeyedSetup; reply: PrekeyedShares
    # A server-drawn graph (semi-honest): setup, shares and masked input in one trip.
    KEYED_MASKED_INPUT = "keyed-masked-input"  # request: train + GraphSetup; reply:
    # PrekeyedShares and the masked vector
    SHARE_KEYS = "share-keys"  # request: ShareKeysRequest; reply: EncryptedShares
    MASKED_INPUT = "masked-input"  # request: train + MaskedInputRequest; reply: masked vector
    CONSISTENCY = "consistency"  # request: ConsistencyRequest; reply: ConsistencySignature
    UNMASK = "unmask"  # request: UnmaskRequest; reply: UnmaskResponse


@dataclass(frozen=True, slots=True)
class Envelope:
    """One stage message: which stage, which round, the wire-encoded message."""

    stage: Stage
    round_id: bytes
    payload: bytes

    def to_fields(self) -> dict[str, str | bytes]:
        """Return the envelope as flat fields (a Flower ConfigRecord's content)."""
        return {_STAGE: self.stage.value, _ROUND: self.round_id, _PAYLOAD: self.payload}

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> Envelope:
        """Validate flat fields and return the envelope.

        Raises
        ------
        InvalidMessage
            If a field is missing, of the wrong type or out of range.
        """
        if set(fields) != {_STAGE, _ROUND, _PAYLOAD}:
            raise InvalidMessage(f"a secure-aggregation envelope has fields {sorted(fields)}")
        stage, round_id, payload = fields[_STAGE], fields[_ROUND], fields[_PAYLOAD]
        if not isinstance(stage, str) or not isinstance(round_id, bytes):
            raise InvalidMessage("envelope stage must be text and round id bytes")
        if not isinstance(payload, bytes) or len(payload) > _MAX_PAYLOAD:
            raise InvalidMessage("envelope payload must be bytes of bounded size")
        if not 16 <= len(round_id) <= 64:
            raise InvalidMessage("envelope round id of the wrong size")
        try:
            parsed = Stage(stage)
        except ValueError as exc:
            raise InvalidMessage(f"unknown secure-aggregation stage {stage!r}") from exc
        return cls(parsed, round_id, payload)
