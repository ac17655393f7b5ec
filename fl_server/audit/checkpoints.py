"""Signed checkpoints of the audit chain's head, and where they are anchored.

A checkpoint is an Ed25519 signature over (sequence number, head hash, time).
The hash chain alone shows an edit in the middle, but not a tail cut off with
the head row moved back, nor a whole chain rewritten consistently: anyone with
write access to the database can recompute SHA-256. A checkpoint signed with a
key that is *not* the database credential, and kept where the database's
writer cannot reach (an anchor: an append-only file on another volume, a WORM
bucket, a transparency log, or a file a compliance team exports and keeps),
turns both into detected tampering: the chain must still reach every
checkpoint's sequence number and hash there exactly what was signed.

Notes
-----
Threat model: an attacker who can write the database but holds neither the
checkpoint key nor write access to an anchor cannot make a cut or a rewrite
verify against a checkpoint taken after the records they changed. Records
appended after the newest checkpoint are protected by the chain only until the
next checkpoint (the coordinator signs one at the end of every run and every
``interval`` records). An attacker who holds the key can sign a rewritten
head; anchors that keep every checkpoint in append-only storage still show the
fork (two checkpoints that disagree), which :func:`fl_server.audit.verify.verify_trail`
reports.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from edge_runtime.secret_files import read_secret, write_secret
from fedge.errors import ConfigError, StorageError
from fl_server.audit.events import canonical_json
from fl_server.db.schema import AuditCheckpointRow, AuditHeadRow

if TYPE_CHECKING:
    from fl_server.audit.anchors import CheckpointAnchor

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "CheckpointSigner",
    "checkpoint_now",
    "is_hex",
    "key_id",
    "public_path",
    "read_public_key",
    "stored_checkpoints",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fedge-audit-checkpoint/v1"
_HEX64 = frozenset("0123456789abcdef")
_MAX_FILE_BYTES = 64 * 2**20
# A checkpoint's fields, as its database row stores them (same names).
_STORED = ("seq", "head_hash", "signed_at", "reason", "public_key", "signature")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def key_id(public_key: bytes) -> str:
    """Return the 16-hex-digit id of a raw Ed25519 public key (SHA-256 prefix)."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def is_hex(value: object, length: int) -> bool:
    """Return whether ``value`` is a string of exactly ``length`` lowercase hex digits."""
    return isinstance(value, str) and len(value) == length and set(value) <= _HEX64


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """One signed statement: "the chain's record ``seq`` has hash ``head_hash``".

    ``public_key`` travels with the checkpoint so a holder can see which key
    signed it; whether that key is *trusted* is the verifier's decision.
    """

    seq: int
    head_hash: str
    signed_at: str
    public_key: str
    signature: str
    reason: str = "manual"

    def __post_init__(self) -> None:
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or self.seq < 0:
            raise ConfigError(f"a checkpoint's seq must be an integer >= 0, got {self.seq!r}")
        if not is_hex(self.head_hash, 64):
            raise ConfigError("a checkpoint's head_hash must be 64 lowercase hex digits")
        if not is_hex(self.public_key, 64):
            raise ConfigError("a checkpoint's public_key must be 64 lowercase hex digits")
        if not is_hex(self.signature, 128):
            raise ConfigError("a checkpoint's signature must be 128 lowercase hex digits")
        try:
            moment = datetime.fromisoformat(self.signed_at)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"a checkpoint's signed_at is not a time: {self.signed_at!r}"
            ) from exc
        if moment.tzinfo is None:
            raise ConfigError("a checkpoint's signed_at must carry a timezone")
        if not isinstance(self.reason, str) or not 0 < len(self.reason) <= 32:
            raise ConfigError("a checkpoint's reason has 1..32 characters")

    @property
    def key_id(self) -> str:
        """The signing key's id (:func:`key_id`)."""
        return key_id(bytes.fromhex(self.public_key))

    def message(self) -> bytes:
        """Return the exact bytes signed: canonical JSON of what the checkpoint states."""
        return canonical_json(
            {
                "format": CHECKPOINT_FORMAT,
                "seq": self.seq,
                "head_hash": self.head_hash,
                "signed_at": self.signed_at,
                "reason": self.reason,
                "key_id": self.key_id,
            }
        ).encode("utf-8")

    def signature_valid(self) -> bool:
        """Return whether the signature verifies under the checkpoint's own public key."""
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(self.public_key)).verify(
                bytes.fromhex(self.signature), self.message()
            )
        except (InvalidSignature, ValueError):
            return False
        return True

    def to_json(self) -> dict[str, Any]:
        """Return the checkpoint as a JSON object (what anchors and exports store)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "seq": self.seq,
            "head_hash": self.head_hash,
            "signed_at": self.signed_at,
            "reason": self.reason,
            "key_id": self.key_id,
            "public_key": self.public_key,
            "signature": self.signature,
        }

    def to_row(self) -> AuditCheckpointRow:
        """Return the database row that stores this checkpoint."""
        return AuditCheckpointRow(**{name: getattr(self, name) for name in _STORED})

    @classmethod
    def from_row(cls, row: AuditCheckpointRow) -> Checkpoint:
        """Parse a stored row (its fields are checked like any other input).

        Raises
        ------
        ConfigError
            If a field is malformed.
        """
        return cls(**{name: getattr(row, name) for name in _STORED})

    @classmethod
    def from_json(cls, document: object) -> Checkpoint:
        """Parse :meth:`to_json`'s form.

        Raises
        ------
        ConfigError
            If a field is missing, malformed, or the key id does not match the key.
        """
        if not isinstance(document, dict):
            raise ConfigError("a checkpoint must be a JSON object")
        if document.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"not a {CHECKPOINT_FORMAT} checkpoint")
        try:
            checkpoint = cls(
                seq=document["seq"],
                head_hash=document["head_hash"],
                signed_at=document["signed_at"],
                reason=document.get("reason", "manual"),
                public_key=document["public_key"],
                signature=document["signature"],
            )
        except KeyError as exc:
            raise ConfigError(f"a checkpoint lacks {exc.args[0]!r}") from exc
        if document.get("key_id", checkpoint.key_id) != checkpoint.key_id:
            raise ConfigError("a checkpoint's key_id does not match its public key")
        return checkpoint


class CheckpointSigner:
    """The Ed25519 key that signs checkpoints (never the database's credential).

    Parameters
    ----------
    private_key
        The signing key.
    clock
        Returns the current time (timezone-aware); injected so tests control time.
    """

    def __init__(
        self, private_key: Ed25519PrivateKey, *, clock: Callable[[], datetime] = _utc_now
    ) -> None:
        self._key = private_key
        self._clock = clock

    @classmethod
    def load_or_create(
        cls, path: Path, *, clock: Callable[[], datetime] = _utc_now
    ) -> CheckpointSigner:
        """Load the key at ``path`` (PEM, mode 0600), creating it and its ``.pub`` if missing.

        Raises
        ------
        ConfigError
            If the file is readable by others or is not an Ed25519 key.
        StorageError
            If it cannot be read or written.
        """
        if not path.exists():
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            write_secret(path, pem)
            public_path(path).write_text(key.public_key().public_bytes_raw().hex() + "\n")
            logger.info("created the audit checkpoint key %s", path)
            return cls(key, clock=clock)
        return cls.load(path, clock=clock)

    @classmethod
    def load(cls, path: Path, *, clock: Callable[[], datetime] = _utc_now) -> CheckpointSigner:
        """Load the key at ``path``.

        Raises
        ------
        ConfigError
            If it is exposed to other users or is not an Ed25519 private key.
        StorageError
            If it cannot be read.
        """
        data = read_secret(path)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path} is not a PEM private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} is not an Ed25519 key")
        return cls(key, clock=clock)

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte public key verifiers trust."""
        return self._key.public_key().public_bytes_raw()

    def sign(self, seq: int, head_hash: str, *, reason: str = "manual") -> Checkpoint:
        """Return a checkpoint of record ``seq`` with hash ``head_hash``, signed now."""
        moment = self._clock()
        if moment.tzinfo is None:
            raise ConfigError("the checkpoint clock must return timezone-aware datetimes")
        unsigned = Checkpoint(
            seq=seq,
            head_hash=head_hash,
            signed_at=moment.astimezone(UTC).isoformat(timespec="microseconds"),
            reason=reason,
            public_key=self.public_key.hex(),
            signature="0" * 128,
        )
        signature = self._key.sign(unsigned.message()).hex()
        return Checkpoint(
            seq=unsigned.seq,
            head_hash=unsigned.head_hash,
            signed_at=unsigned.signed_at,
            reason=unsigned.reason,
            public_key=unsigned.public_key,
            signature=signature,
        )


def public_path(key_path: Path) -> Path:
    """Return where the public half of the key at ``key_path`` is written (``.pub`` beside it)."""
    return key_path.with_suffix(".pub")


def read_public_key(path: Path) -> bytes:
    """Read a raw Ed25519 public key written as 64 hex digits (a ``.pub`` file).

    Raises
    ------
    ConfigError
        If the file does not hold 64 hex digits.
    StorageError
        If it cannot be read.
    """
    try:
        text = path.read_text(encoding="ascii").strip().lower()
    except (OSError, UnicodeDecodeError) as exc:
        raise StorageError(f"cannot read the checkpoint public key {path}: {exc}") from exc
    if not is_hex(text, 64):
        raise ConfigError(f"{path} does not hold an Ed25519 public key (64 hex digits)")
    return bytes.fromhex(text)


def checkpoint_now(
    engine: Engine,
    signer: CheckpointSigner,
    anchors: Iterable[CheckpointAnchor] = (),
    *,
    reason: str = "manual",
) -> Checkpoint:
    """Sign the chain's current head, store it in the database and append it to ``anchors``.

    The head is read and the checkpoint row written in one transaction, so the
    checkpoint names a head that existed. An anchor that fails raises after
    the database row is written: the checkpoint exists, the anchor lacks it.

    Raises
    ------
    StorageError
        If the database or an anchor cannot be written.
    """
    try:
        with Session(engine) as session, session.begin():
            head = session.get(AuditHeadRow, 1)
            if head is None:
                raise StorageError("the audit log has no head row: is the database migrated?")
            checkpoint = signer.sign(head.seq, head.record_hash, reason=reason)
            session.add(checkpoint.to_row())
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot store the audit checkpoint: {exc}") from exc
    for anchor in anchors:
        anchor.append(checkpoint)
    logger.info(
        "audit checkpoint: record %d, head %s… (%s)",
        checkpoint.seq,
        checkpoint.head_hash[:12],
        reason,
    )
    return checkpoint


def stored_checkpoints(engine: Engine) -> tuple[list[Checkpoint], list[str]]:
    """Return the checkpoints in the database's own table, and rows that do not parse.

    Raises
    ------
    StorageError
        If the table cannot be read.
    """
    try:
        with Session(engine) as session:
            rows = list(session.scalars(select(AuditCheckpointRow).order_by(AuditCheckpointRow.id)))
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot read the audit checkpoints: {exc}") from exc
    found: list[Checkpoint] = []
    problems: list[str] = []
    for row in rows:
        try:
            found.append(Checkpoint.from_row(row))
        except ConfigError as exc:
            problems.append(f"checkpoint row {row.id}: {exc}")
    return found, problems
