"""Anchors: where signed checkpoints are kept outside the database, and exported files.

An anchor is append-only storage the database's writer cannot rewrite; a
checkpoint file is what a compliance team keeps (``fedge audit checkpoint --out``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from fedge.errors import ConfigError, StorageError
from fl_server.audit.checkpoints import CHECKPOINT_FORMAT, Checkpoint, is_hex
from fl_server.audit.events import canonical_json, parse_canonical

__all__ = ["CheckpointAnchor", "FileAnchor", "load_checkpoint_file", "write_checkpoint_file"]

_MAX_FILE_BYTES = 64 * 2**20


class CheckpointAnchor(Protocol):
    """An append-only place outside the database where checkpoints are kept.

    An implementation must never drop or rewrite what it accepted; reading
    returns every checkpoint in the order appended, and what it cannot parse
    as a problem instead of failing (a damaged anchor is evidence too).
    """

    name: str

    def append(self, checkpoint: Checkpoint) -> None:
        """Keep ``checkpoint`` durably before returning."""

    def read(self) -> tuple[list[Checkpoint], list[str]]:
        """Return the checkpoints kept, and a description of every unreadable entry."""


class FileAnchor:
    """An anchor in a local JSON-lines file: appended, fsynced, never rewritten.

    Put it on storage the database's writer cannot modify (another volume, a
    host path mounted append-only, a synced WORM bucket) for it to add anything
    beyond the database's own checkpoint table.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"file:{path}"

    def append(self, checkpoint: Checkpoint) -> None:
        """Append one line and fsync it (and the directory, on first creation)."""
        line = (canonical_json(checkpoint.to_json()) + "\n").encode("utf-8")
        created = not self.path.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(descriptor, line)
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            if created:
                directory = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
        except OSError as exc:
            raise StorageError(
                f"cannot append to the checkpoint anchor {self.path}: {exc}"
            ) from exc

    def read(self) -> tuple[list[Checkpoint], list[str]]:
        """Return the checkpoints in the file and its unreadable lines (none if it is missing)."""
        if not self.path.exists():
            return [], []
        try:
            if self.path.stat().st_size > _MAX_FILE_BYTES:
                return [], [f"{self.path} is larger than {_MAX_FILE_BYTES} bytes"]
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            return [], [f"cannot read {self.path}: {exc}"]
        found: list[Checkpoint] = []
        problems: list[str] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                found.append(Checkpoint.from_json(parse_canonical(line)))
            except ConfigError as exc:
                problems.append(f"{self.path} line {number}: {exc}")
        return found, problems


def write_checkpoint_file(path: Path, checkpoint: Checkpoint, record_hashes: Sequence[str]) -> None:
    """Export ``checkpoint`` for safekeeping outside the system, with the chain's record hashes.

    ``record_hashes`` (record 1 first, up to the checkpoint's record) are not
    signed; they let a later verification name the first record a rewrite
    changed. The signed head decides whether the chain verifies.

    Raises
    ------
    ConfigError
        If the hashes do not end at the checkpoint's record and hash.
    StorageError
        If the file cannot be written.
    """
    if len(record_hashes) != checkpoint.seq or (
        record_hashes and record_hashes[-1] != checkpoint.head_hash
    ):
        raise ConfigError("the record hashes do not end at the checkpoint's head")
    document = {
        "format": CHECKPOINT_FORMAT,
        "checkpoint": checkpoint.to_json(),
        "record_hashes": list(record_hashes),
    }
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with temporary.open("w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise StorageError(f"cannot write the checkpoint file {path}: {exc}") from exc


def load_checkpoint_file(path: Path) -> tuple[Checkpoint, list[str]]:
    """Read a file :func:`write_checkpoint_file` wrote: the checkpoint and its record hashes.

    Also accepts a bare checkpoint object (no record hashes).

    Raises
    ------
    ConfigError
        If the file is not a checkpoint or its record hashes are malformed.
    StorageError
        If it cannot be read.
    """
    try:
        if path.stat().st_size > _MAX_FILE_BYTES:
            raise ConfigError(f"{path} is larger than {_MAX_FILE_BYTES} bytes")
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise StorageError(f"cannot read the checkpoint file {path}: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"{path} is not JSON: {exc}") from exc
    if isinstance(document, dict) and "checkpoint" in document:
        checkpoint = Checkpoint.from_json(document["checkpoint"])
        hashes = document.get("record_hashes", [])
    else:
        checkpoint, hashes = Checkpoint.from_json(document), []
    if not isinstance(hashes, list) or not all(is_hex(h, 64) for h in hashes):
        raise ConfigError(f"{path}: record_hashes must be a list of 64-hex-digit hashes")
    if hashes and (len(hashes) != checkpoint.seq or hashes[-1] != checkpoint.head_hash):
        raise ConfigError(f"{path}: the record hashes do not end at the checkpoint's head")
    return checkpoint, hashes
