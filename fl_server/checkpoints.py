"""Save each round's global weights to a directory, with their SHA-256.

A stop-gap until the model store: one deterministic ``.npz`` per round, written
atomically (temporary file, fsync, rename), so a crash never leaves a
half-written checkpoint under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedge.errors import ConfigError, StorageError

__all__ = ["CheckpointDir", "SavedModel", "load_weights", "weights_to_npz"]

# A fixed timestamp makes the archive a pure function of the weights, so equal
# weights give equal digests (and the model store can deduplicate them).
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True, slots=True)
class SavedModel:
    """Where a checkpoint lies and what it hashes to."""

    server_round: int
    path: Path
    sha256: str
    size_bytes: int


def weights_to_npz(weights: Mapping[str, npt.NDArray[np.generic]]) -> bytes:
    """Serialise named arrays to deterministic ``.npz`` bytes (order of ``weights`` kept)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in weights.items():
            if not _NAME.fullmatch(name):
                raise ConfigError(f"weight name {name!r} has characters outside [A-Za-z0-9_.-]")
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def load_weights(path: Path, *, expected_sha256: str) -> dict[str, npt.NDArray[np.generic]]:
    """Read a checkpoint after checking its SHA-256.

    Raises
    ------
    StorageError
        If the file is missing, unreadable or its digest differs.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read checkpoint {path}: {exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise StorageError(f"checkpoint {path} is corrupt: SHA-256 {actual} != {expected_sha256}")
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


class CheckpointDir:
    """A directory of per-round checkpoints ``round-0003.npz``."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    @property
    def directory(self) -> Path:
        """The directory the checkpoints are written to."""
        return self._directory

    def save(self, server_round: int, weights: Mapping[str, npt.NDArray[np.generic]]) -> SavedModel:
        """Write one round's weights atomically and return their digest.

        Raises
        ------
        ConfigError
            If the round is negative or a weight name is unsafe.
        StorageError
            If the file cannot be written.
        """
        if server_round < 0:
            raise ConfigError(f"server_round must be >= 0, got {server_round}")
        data = weights_to_npz(weights)
        final = self._directory / f"round-{server_round:04d}.npz"
        temporary = final.with_suffix(f".npz.tmp-{os.getpid()}")
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            temporary.replace(final)
            directory_fd = os.open(self._directory, os.O_RDONLY)
            try:
                os.fsync(directory_fd)
            finally:
                os.close(directory_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            raise StorageError(f"cannot write checkpoint {final}: {exc}") from exc
        return SavedModel(
            server_round=server_round,
            path=final,
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
        )
