"""Durable file writes for the device runtime and the model store.

Fsynced creates, atomic replaces (temporary file, fsync, rename, directory fsync), hashing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "TEMPORARY_SUFFIX",
    "append_synced",
    "create_synced",
    "fsync_directory",
    "hash_file",
    "write_all",
    "write_atomically",
]

_CHUNK = 1 << 20
# Writes go out in 64 KiB slices: on the Linux 6.18 / ext4 hosts we measured, one
# write() of more than 64 KiB into fresh page-cache pages ran ~8x slower (100 ms
# against 12 ms for 40 MiB). The extra system calls cost nothing measurable.
_WRITE_SLICE = 64 << 10
TEMPORARY_SUFFIX = ".tmp"


def _no_hook(step: str) -> None:
    del step


def fsync_directory(directory: Path) -> None:
    """Make a rename or create in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_file(path: Path) -> tuple[int, str]:
    """Return the size and SHA-256 (hex) of a file, read in 1 MiB chunks."""
    hasher, size = hashlib.sha256(), 0
    with open(path, "rb", buffering=0) as source:
        while chunk := source.read(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return size, hasher.hexdigest()


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` in 64 KiB slices."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:_WRITE_SLICE]) :]


def append_synced(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Append ``data`` to ``path`` (created with ``mode`` if missing), fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def create_synced(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` holding ``data``, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(
    path: Path, data: bytes, hook: Callable[[str], None] = _no_hook, *, mode: int = 0o644
) -> None:
    """Replace ``path`` with ``data``: temporary file, fsync, ``os.replace``, directory fsync.

    ``hook("pointer-temp")`` runs between the fsynced temporary and the rename
    (tests kill a process there).
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}{TEMPORARY_SUFFIX}")
    try:
        create_synced(temporary, data, mode)
        hook("pointer-temp")
        temporary.replace(path)
        fsync_directory(path.parent)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
