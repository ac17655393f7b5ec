"""Where a fedge home keeps what anchors its audit trail: the checkpoint key and anchor file.

Layout (under the fedge home, or a deployment directory)::

    audit/checkpoint-key.pem    the Ed25519 key that signs checkpoints (mode 600)
    audit/checkpoint-key.pub    its public half (64 hex digits): what verifiers trust
    audit/checkpoints.jsonl     the file anchor: every checkpoint, appended and fsynced

The key is not the database's credential: a database writer who holds only
that cannot sign a checkpoint. For the anchor to add protection beyond the
database's own checkpoint table, put ``audit/`` (or a symlink to it) on storage
the database's host cannot rewrite, and export checkpoints to a compliance
team (``fedge audit checkpoint --out FILE``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from fl_server.audit.anchors import FileAnchor, load_checkpoint_file
from fl_server.audit.chain import read_head
from fl_server.audit.checkpoints import (
    Checkpoint,
    CheckpointSigner,
    checkpoint_now,
    public_path,
    read_public_key,
    stored_checkpoints,
)
from fl_server.audit.verify import SourcedCheckpoint, TrailVerification, verify_trail

__all__ = [
    "DEFAULT_INTERVAL",
    "AuditTrust",
    "Checkpointer",
    "trusted",
    "verify_with_trust",
]

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL = 100


@dataclass(frozen=True, slots=True)
class AuditTrust:
    """The checkpoint key and anchor of one home (see the module docstring)."""

    directory: Path

    @classmethod
    def of_home(cls, root: Path) -> AuditTrust:
        """Return the layout under the fedge home (or deployment directory) ``root``."""
        return cls(root / "audit")

    @property
    def key_path(self) -> Path:
        """The private checkpoint key."""
        return self.directory / "checkpoint-key.pem"

    @property
    def public_key_path(self) -> Path:
        """The public half verifiers trust."""
        return public_path(self.key_path)

    @property
    def anchor(self) -> FileAnchor:
        """The file anchor."""
        return FileAnchor(self.directory / "checkpoints.jsonl")

    def signer(self) -> CheckpointSigner:
        """Load the checkpoint key, creating it (and its public half) on first use."""
        return CheckpointSigner.load_or_create(self.key_path)

    def trusted_key(self) -> bytes | None:
        """Return the public key in ``checkpoint-key.pub``, or ``None`` if there is none."""
        path = self.public_key_path
        return read_public_key(path) if path.exists() else None

    def checkpoints(self, engine: Engine) -> tuple[list[SourcedCheckpoint], list[str]]:
        """Return the checkpoints of the database's table and of the anchor, and unreadable ones."""
        stored, problems = stored_checkpoints(engine)
        anchored, anchor_problems = self.anchor.read()
        found = [SourcedCheckpoint(c, "database") for c in stored]
        found += [SourcedCheckpoint(c, self.anchor.name) for c in anchored]
        return found, problems + anchor_problems

    def trusted_checkpoints(
        self, engine: Engine, key: bytes | None
    ) -> tuple[list[Checkpoint], list[str]]:
        """Return the checkpoints :meth:`checkpoints` finds that ``key`` validly signed.

        ``None`` (no key known): none, since an unsigned claim is no evidence.
        """
        found, problems = self.checkpoints(engine)
        return ([] if key is None else trusted(found, key)), problems


def trusted(checkpoints: Sequence[SourcedCheckpoint], key: bytes) -> list[Checkpoint]:
    """Return the checkpoints validly signed by ``key`` (the others are not evidence)."""
    return [
        item.checkpoint
        for item in checkpoints
        if item.checkpoint.public_key == key.hex() and item.checkpoint.signature_valid()
    ]


class Checkpointer:
    """Sign a checkpoint every ``interval`` records and when asked (a run's end).

    A :class:`~fl_server.federation.RoundObserver`: after each round it checks
    how far the head moved since the last checkpoint.
    """

    def __init__(
        self,
        engine: Engine,
        trust: AuditTrust,
        *,
        interval: int = DEFAULT_INTERVAL,
        signer: CheckpointSigner | None = None,
    ) -> None:
        if interval < 1:
            raise ValueError(f"the checkpoint interval must be >= 1, got {interval}")
        self._engine = engine
        self._trust = trust
        self._signer = signer or trust.signer()
        self._interval = interval
        head = read_head(engine)
        self._last = 0 if head is None else head.seq

    @property
    def public_key(self) -> bytes:
        """The key the checkpoints are signed with."""
        return self._signer.public_key

    def on_round(self, report: object) -> None:
        """Checkpoint if ``interval`` records were appended since the last one."""
        head = read_head(self._engine)
        if head is not None and head.seq - self._last >= self._interval:
            self.checkpoint("interval")

    def checkpoint(self, reason: str) -> Checkpoint:
        """Sign the current head now and anchor it."""
        made = checkpoint_now(self._engine, self._signer, [self._trust.anchor], reason=reason)
        self._last = made.seq
        return made


def verify_with_trust(
    engine: Engine,
    trust: AuditTrust,
    *,
    checkpoint_files: Sequence[Path] = (),
    public_key: bytes | None = None,
    expect_head: str | None = None,
    store_public_key: bytes | None = None,
) -> tuple[TrailVerification, list[str]]:
    """Verify the trail against every checkpoint a home keeps and the files given.

    Trusted keys: ``public_key`` if given, else the home's ``checkpoint-key.pub``,
    plus the key of every checkpoint file (a file kept outside the system is
    evidence by its custody). With no trusted key at all, any validly signed
    checkpoint is accepted and a warning says so.

    Returns
    -------
    tuple
        The result, and notes on unreadable checkpoints or an unpinned key.

    Raises
    ------
    ConfigError, StorageError
        If a checkpoint file or key cannot be read or parsed.
    """
    sourced, notes = trust.checkpoints(engine)
    exported: list[str] = []
    pinned = public_key if public_key is not None else trust.trusted_key()
    keys = set() if pinned is None else {pinned}
    for path in checkpoint_files:
        checkpoint, hashes = load_checkpoint_file(path)
        sourced.append(SourcedCheckpoint(checkpoint, f"file:{path}"))
        keys.add(bytes.fromhex(checkpoint.public_key))
        if len(hashes) > len(exported):
            exported = hashes
    result = verify_trail(
        engine,
        checkpoints=sourced,
        trusted_keys=keys or None,
        record_hashes=exported,
        expect_head=expect_head,
        store_public_key=store_public_key,
    )
    if not keys and result.checkpoints_checked:
        notes.append(
            "no trusted checkpoint key (audit/checkpoint-key.pub is missing): checkpoints "
            "signed by any key were accepted; pin one with --public-key"
        )
    return result, notes
