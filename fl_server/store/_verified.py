"""Verified reads of stored objects: an open, hashed blob and the memo of recent hashes.

Used by :meth:`fl_server.store.blobs.FileBlobStore.open_verified`; see that
module's docstring for what the memo trades.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fedge.errors import ConfigError, StorageError

__all__ = ["FileStamp", "VerificationMemo", "VerifiedBlob", "file_stamp"]

_CHUNK = 1 << 20

# What identifies one version of an object file: the digest it is stored under, its
# device and inode, its size, and its modification and status-change times in ns.
# Any write, chmod, touch or replacement changes at least one (the status-change
# time cannot be set from user space, so a touch that puts mtime back still shows).
FileStamp = tuple[str, int, int, int, int, int]


def file_stamp(digest: str, status: os.stat_result) -> FileStamp:
    """Return the stamp of the object file ``digest`` whose ``fstat`` is ``status``."""
    return (
        digest,
        status.st_dev,
        status.st_ino,
        status.st_size,
        status.st_mtime_ns,
        status.st_ctime_ns,
    )


@dataclass(frozen=True, slots=True)
class VerifiedBlob:
    """An open blob whose content hashed to its digest.

    Attributes
    ----------
    file
        The open file, positioned at byte 0; closed when the context that
        yielded it ends.
    size
        Its size in bytes.
    """

    file: io.RawIOBase
    size: int

    def read_range(self, start: int, end: int, *, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        """Yield bytes ``start`` to ``end`` (inclusive) in chunks of at most ``chunk_size``.

        Reads by offset (``pread``): the file position is left alone and at most
        one chunk is held at a time.

        Raises
        ------
        ConfigError
            If the range is outside the blob or ``chunk_size`` is not positive.
        StorageError
            If the file cannot be read, or it ends early (it shrank since it was hashed).
        """
        if not 0 <= start <= end < self.size:
            raise ConfigError(f"range {start}-{end} is outside a blob of {self.size} bytes")
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        fd = self.file.fileno()
        offset = start
        while offset <= end:
            try:
                chunk = os.pread(fd, min(chunk_size, end + 1 - offset), offset)
            except OSError as exc:
                raise StorageError(f"cannot read a blob at offset {offset}: {exc}") from exc
            if not chunk:
                raise StorageError(f"a blob ended at byte {offset}, before byte {end}")
            offset += len(chunk)
            yield chunk


class VerificationMemo:
    """Remember, for ``ttl_s`` seconds, which object files hashed right (or wrong).

    One thread hashes a given file while the others that want it wait for its
    outcome (single flight): a burst of a thousand requests for a newly offered
    object costs one hash. A bad outcome is remembered too, so a burst for a
    corrupt object is refused at the cost of one hash; repairing an object
    replaces its file (a new inode, so a new stamp).

    Parameters
    ----------
    ttl_s
        How long an outcome stands; 0 remembers nothing (every check hashes).
    clock
        Monotonic seconds.
    """

    def __init__(self, ttl_s: float, clock: Callable[[], float]) -> None:
        if not ttl_s >= 0:
            raise ConfigError(f"verification_ttl_s must be >= 0, got {ttl_s}")
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._outcomes: dict[FileStamp, tuple[float, bool]] = {}
        self._gates: dict[FileStamp, threading.Lock] = {}

    def _fresh(self, stamp: FileStamp) -> bool | None:
        """Return the remembered outcome if it has not expired (call under ``_lock``)."""
        entry = self._outcomes.get(stamp)
        if entry is None:
            return None
        expires, ok = entry
        if self._clock() >= expires:
            del self._outcomes[stamp]
            return None
        return ok

    def check(self, stamp: FileStamp, hashes_right: Callable[[], bool]) -> bool:
        """Return whether the file hashes right: remembered, or ``hashes_right()`` run once.

        An exception from ``hashes_right`` (the file could not be read) is raised
        to the caller and remembers nothing.
        """
        if self._ttl_s <= 0:
            return hashes_right()
        with self._lock:
            known = self._fresh(stamp)
            if known is not None:
                return known
            gate = self._gates.setdefault(stamp, threading.Lock())
        with gate:
            with self._lock:
                known = self._fresh(stamp)
            if known is not None:
                return known
            try:
                ok = hashes_right()
            finally:
                with self._lock:
                    self._gates.pop(stamp, None)
            with self._lock:
                now = self._clock()
                # Expired outcomes go, so the memo holds only the objects of the last ttl_s.
                for key in [k for k, (expires, _) in self._outcomes.items() if expires <= now]:
                    del self._outcomes[key]
                self._outcomes[stamp] = (now + self._ttl_s, ok)
            return ok
