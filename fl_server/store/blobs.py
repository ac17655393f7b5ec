"""Content-addressed artefact files: each blob is stored once, under its SHA-256.

Layout under the store root::

    objects/<first two hex digits>/<sha256>   immutable objects, mode 0o444
    tmp/<pid>-<random>.tmp                    writes in progress (same file system)

Notes
-----
Every digest that reaches a path goes through :func:`check_digest` first, so a
digest read from the network or a database can never name a file outside
``objects/`` (``"../x"``, ``"/etc/passwd"``). Every read (``get``, ``verify``,
``export``) re-hashes the bytes: a blob that rotted on disk or was edited by hand
raises :class:`BlobCorrupt` and is never returned. A write goes to ``tmp/`` first
and is renamed into place only after ``fsync``, so a crash never leaves a partial
object under its final name; the temporary files a killed writer leaves are
removed by :meth:`FileBlobStore.remove_stale_temporaries` (``fedge store gc``).

:meth:`FileBlobStore.open_verified` serves ranges of large objects without holding
them in memory: it hashes the open file in full, then hands it out. The outcome
of that hash is remembered for a short time (``verification_ttl_s``, 30 s by
default) under the file's identity and change stamps (device, inode, size,
modification and status-change times in nanoseconds), so a thousand devices
fetching the same object at once cost one hash, not a thousand. Any write to the
file, ``chmod`` or ``touch`` (even one that puts the modification time back: the
status-change time cannot be set) and any replacement (a new inode) changes the
stamp, so the next open hashes again. What the memo cannot see is bit rot that
changes no stamp: the server misses it for at most ``verification_ttl_s``, while
devices still check every download against the signed digest, so such bytes are
refused there, never installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edge_runtime.durable import fsync_directory, write_all
from edge_runtime.manifest import check_digest
from fedge.errors import ConfigError, StorageError
from fl_server.store._verified import VerificationMemo, VerifiedBlob, file_stamp

__all__ = [
    "BlobCorrupt",
    "BlobMissing",
    "BlobRef",
    "BlobStore",
    "FileBlobStore",
    "VerifiedBlob",
]

_LOGGER = logging.getLogger(__name__)
_DIGEST = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20
# How many chunks a reader may run ahead of the hashing thread (bounds memory).
_MAX_PENDING = 4
_TEMPORARY_SUFFIX = ".tmp"


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True, slots=True)
class BlobRef:
    """A stored blob: its SHA-256 and its size in bytes."""

    digest: str
    size: int

    def __post_init__(self) -> None:
        check_digest(self.digest)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ConfigError(f"blob size must be an int >= 0, got {_preview(self.size)}")


class BlobMissing(StorageError):  # noqa: N818 - reads as what happened
    """No blob with the requested digest is in the store."""


class BlobCorrupt(StorageError):  # noqa: N818 - reads as what happened
    """A stored blob no longer hashes to its digest; its bytes are never returned."""


class BlobStore(Protocol):
    """What the model store needs from a content-addressed blob store."""

    def put(self, data: bytes) -> BlobRef:
        """Store ``data`` (once, however often it is put) and return its reference."""

    def put_file(self, path: Path) -> BlobRef:
        """Store the content of ``path``, streaming it, and return its reference."""

    def get(self, digest: str) -> bytes:
        """Return the verified bytes of a blob."""

    def exists(self, digest: str) -> bool:
        """Say whether a blob is present (without verifying it)."""

    def size(self, digest: str) -> int:
        """Return the size of a blob in bytes."""

    def stored_at(self, digest: str) -> float:
        """Return when a blob was (last) written, in seconds since the epoch."""

    def delete(self, digest: str) -> bool:
        """Remove a blob; return whether it was there."""

    def digests(self) -> Iterator[str]:
        """Yield the digest of every stored blob, sorted."""

    def verify(self, digest: str) -> None:
        """Re-hash a blob without returning it; raise if it is missing or corrupt."""

    def export(self, digest: str, destination: Path) -> None:
        """Copy a blob's verified bytes to ``destination`` atomically."""

    def open_verified(self, digest: str) -> contextlib.AbstractContextManager[VerifiedBlob]:
        """Open a blob whose SHA-256 was checked in full; read it while the context lasts."""

    def remove_stale_temporaries(self, min_age_s: float, *, dry_run: bool = False) -> int:
        """Remove (or only count) writes abandoned more than ``min_age_s`` ago."""


class _Hasher:
    """SHA-256 fed from the caller's thread and computed on a worker thread.

    hashlib releases the GIL on large buffers, so hashing one chunk overlaps the
    read or write of the next: a put or get then costs about the hash alone.
    """

    def __init__(self, executor: ThreadPoolExecutor | None) -> None:
        self._hash = hashlib.sha256()
        self._executor = executor
        self._pending: deque[Future[None]] = deque()

    def update(self, chunk: bytes | memoryview) -> None:
        if self._executor is None:
            self._hash.update(chunk)
            return
        self._pending.append(self._executor.submit(self._hash.update, chunk))
        while len(self._pending) > _MAX_PENDING:
            self._pending.popleft().result()

    def hexdigest(self) -> str:
        while self._pending:
            self._pending.popleft().result()
        return self._hash.hexdigest()


@contextlib.contextmanager
def _hashing(size: int) -> Iterator[_Hasher]:
    if size <= _CHUNK:  # a thread would cost more than it saves
        yield _Hasher(None)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-sha256") as executor:
        yield _Hasher(executor)


def _chunks_checked(source: io.FileIO, digest: str) -> Iterator[bytes]:
    """Yield ``source`` in 1 MiB chunks, then raise :class:`BlobCorrupt` unless they match."""
    try:
        size = os.fstat(source.fileno()).st_size
    except OSError as exc:
        raise StorageError(f"cannot stat blob {digest}: {exc}") from exc
    with _hashing(size) as hasher:
        while True:
            try:
                chunk = source.read(_CHUNK)
            except OSError as exc:
                raise StorageError(f"cannot read blob {digest}: {exc}") from exc
            if not chunk:
                break
            hasher.update(chunk)
            yield chunk
        actual = hasher.hexdigest()
    if actual != digest:
        raise BlobCorrupt(f"blob {digest} is corrupt: its content hashes to {actual}")


def _same_content(first: Path, second: Path) -> bool:
    with open(first, "rb", buffering=0) as left, open(second, "rb", buffering=0) as right:
        if os.fstat(left.fileno()).st_size != os.fstat(right.fileno()).st_size:
            return False
        while chunk := left.read(_CHUNK):
            if chunk != right.read(len(chunk)):
                return False
    return True


class FileBlobStore:
    """A :class:`BlobStore` in a local directory (see the module docstring for the layout).

    Parameters
    ----------
    root
        The store directory; created if missing.
    durable
        ``fsync`` objects and directories before a write returns (the default).
        ``False`` is for tests and throw-away stores: after a power cut an object
        may then be truncated, which reads detect as :class:`BlobCorrupt`.
    verification_ttl_s
        How long :meth:`open_verified` trusts a file it hashed, while none of its
        stamps changes (see the module docstring); 0 hashes on every open.
    clock
        Monotonic seconds, for that expiry (injected so tests control time).

    Raises
    ------
    ConfigError
        If ``verification_ttl_s`` is negative.
    StorageError
        If the directories cannot be created.
    """

    def __init__(
        self,
        root: Path,
        *,
        durable: bool = True,
        verification_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._memo = VerificationMemo(verification_ttl_s, clock)
        self._root = root
        self._objects = root / "objects"
        self._temporary = root / "tmp"
        self._durable = durable
        try:
            self._objects.mkdir(parents=True, exist_ok=True)
            self._temporary.mkdir(exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the blob store at {root}: {exc}") from exc

    @property
    def root(self) -> Path:
        """The store directory."""
        return self._root

    def _path(self, digest: str) -> Path:
        check_digest(digest)
        return self._objects / digest[:2] / digest

    def _sync_directory(self, directory: Path) -> None:
        if self._durable:
            fsync_directory(directory)

    def put(self, data: bytes) -> BlobRef:
        """Store ``data`` and return its reference (see :meth:`BlobStore.put`).

        Raises
        ------
        StorageError
            If the object cannot be written.
        """
        view = memoryview(data)

        def fill(fd: int, hasher: _Hasher) -> int:
            hasher.update(view)
            write_all(fd, view)
            return len(view)

        with _hashing(len(view)) as hasher:
            return self._store(fill, hasher)

    def put_file(self, path: Path) -> BlobRef:
        """Store the content of ``path`` in 1 MiB chunks, hashing while copying.

        Raises
        ------
        StorageError
            If ``path`` cannot be read or the object cannot be written.
        """
        try:
            source = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc}") from exc

        def fill(fd: int, hasher: _Hasher) -> int:
            size = 0
            while chunk := source.read(_CHUNK):
                hasher.update(chunk)  # a fresh bytes object per chunk: safe to share
                write_all(fd, chunk)
                size += len(chunk)
            return size

        with source, _hashing(os.fstat(source.fileno()).st_size) as hasher:
            return self._store(fill, hasher)

    def _store(self, fill: Callable[[int, _Hasher], int], hasher: _Hasher) -> BlobRef:
        temporary = self._temporary / f"{os.getpid()}-{secrets.token_hex(8)}{_TEMPORARY_SUFFIX}"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            try:
                size = fill(fd, hasher)
                if self._durable:  # before the digest: the sync overlaps the hashing thread
                    os.fsync(fd)
                digest = hasher.hexdigest()
                final = self._objects / digest[:2] / digest
                present = final.exists()
                if present and _same_content(final, temporary):
                    # Stored before: refresh its age, so GC's grace period protects
                    # it until the publish that now references it commits.
                    os.utime(final)
                    return BlobRef(digest=digest, size=size)
            finally:
                os.close(fd)
            if present:
                _LOGGER.warning("blob %s was corrupt on disk; replacing it", digest)
            elif not final.parent.is_dir():
                final.parent.mkdir(exist_ok=True)
                self._sync_directory(self._objects)
            # Identical content by construction, so replacing a racing writer's copy is harmless.
            temporary.replace(final)
            self._sync_directory(final.parent)
        except OSError as exc:
            raise StorageError(f"cannot write a blob under {self._root}: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
        return BlobRef(digest=digest, size=size)

    def _open(self, digest: str) -> io.FileIO:
        path = self._path(digest)
        try:
            return open(path, "rb", buffering=0)
        except FileNotFoundError as exc:
            raise BlobMissing(f"blob {digest} is not in the store at {self._root}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read blob {digest}: {exc}") from exc

    def _verified_chunks(self, digest: str) -> Iterator[bytes]:
        """Yield a blob in 1 MiB chunks, then raise :class:`BlobCorrupt` unless they match."""
        with self._open(digest) as source:
            yield from _chunks_checked(source, digest)

    @contextlib.contextmanager
    def open_verified(self, digest: str) -> Iterator[VerifiedBlob]:
        """Open a blob and check its SHA-256 in full before handing it out.

        The file yielded is the one hashed (no second open a swap could slip
        into), positioned at byte 0; nothing of it is held in memory. A recent
        successful hash of the same file, unchanged, may stand in for a new one
        (``verification_ttl_s``; see the module docstring for what that costs).

        Raises
        ------
        ConfigError
            If ``digest`` is malformed.
        BlobMissing, BlobCorrupt, StorageError
            If the blob is absent, does not hash to its digest, or cannot be read
            (all before the context is entered).
        """
        with self._open(digest) as source:
            try:
                status = os.fstat(source.fileno())
            except OSError as exc:
                raise StorageError(f"cannot stat blob {digest}: {exc}") from exc

            def hashes_right() -> bool:
                source.seek(0)
                try:
                    for _ in _chunks_checked(source, digest):
                        pass
                except BlobCorrupt:
                    return False
                return True

            if not self._memo.check(file_stamp(digest, status), hashes_right):
                raise BlobCorrupt(f"blob {digest} is corrupt: it does not hash to its digest")
            source.seek(0)
            yield VerifiedBlob(file=source, size=status.st_size)

    def get(self, digest: str) -> bytes:
        """Return the bytes of a blob after checking their SHA-256.

        Raises
        ------
        ConfigError
            If ``digest`` is malformed.
        BlobMissing, BlobCorrupt, StorageError
            If the blob is absent, no longer matches its digest, or cannot be read.
        """
        # BytesIO grows by realloc and getvalue() hands over its buffer without a
        # copy (CPython), so a 40 MiB get faults its pages once, beside the hashing.
        buffer = io.BytesIO()
        for chunk in self._verified_chunks(digest):
            buffer.write(chunk)
        return buffer.getvalue()  # reached only once the digest matched

    def verify(self, digest: str) -> None:
        """Re-hash a blob in 1 MiB chunks; raise as :meth:`get` does."""
        for _ in self._verified_chunks(digest):
            pass

    def exists(self, digest: str) -> bool:
        """Say whether a blob is present (without verifying it)."""
        return self._path(digest).is_file()

    def _stat(self, digest: str) -> os.stat_result:
        try:
            return self._path(digest).stat()
        except FileNotFoundError as exc:
            raise BlobMissing(f"blob {digest} is not in the store at {self._root}") from exc
        except OSError as exc:
            raise StorageError(f"cannot stat blob {digest}: {exc}") from exc

    def size(self, digest: str) -> int:
        """Return a blob's size in bytes; raise :class:`BlobMissing` if absent."""
        return self._stat(digest).st_size

    def stored_at(self, digest: str) -> float:
        """Return the blob's modification time; raise :class:`BlobMissing` if absent."""
        return self._stat(digest).st_mtime

    def delete(self, digest: str) -> bool:
        """Remove a blob; return ``False`` if it was not there."""
        path = self._path(digest)
        try:
            path.unlink()
            self._sync_directory(path.parent)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot delete blob {digest}: {exc}") from exc
        return True

    def digests(self) -> Iterator[str]:
        """Yield every stored digest in sorted order (temporary files are ignored)."""
        try:
            shards = sorted(entry.name for entry in self._objects.iterdir() if entry.is_dir())
            for shard in shards:
                for name in sorted(entry.name for entry in (self._objects / shard).iterdir()):
                    if _DIGEST.fullmatch(name) is not None and name[:2] == shard:
                        yield name
        except OSError as exc:
            raise StorageError(f"cannot list the blob store at {self._root}: {exc}") from exc

    def export(self, digest: str, destination: Path) -> None:
        """Copy a blob's verified bytes to ``destination``, atomically.

        The bytes go to a temporary file beside ``destination`` and are renamed
        over it only once the whole blob has hashed to ``digest``.

        Raises
        ------
        BlobMissing, BlobCorrupt, StorageError
            As :meth:`get`, or if ``destination`` cannot be written.
        """
        temporary = destination.with_name(f".{destination.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                for chunk in self._verified_chunks(digest):
                    write_all(fd, chunk)
                if self._durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            temporary.replace(destination)
            self._sync_directory(destination.parent)
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(f"cannot export blob {digest} to {destination}: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)

    def remove_stale_temporaries(
        self, min_age_s: float, *, dry_run: bool = False, now: float | None = None
    ) -> int:
        """Remove the temporary files of writes abandoned long ago; return how many.

        A writer killed between creating ``tmp/<pid>-<random>.tmp`` and renaming it
        into ``objects/`` leaves the file behind; nothing else ever removes it.

        Parameters
        ----------
        min_age_s
            Only files last modified more than this many seconds ago go: a write in
            progress touches its file with every chunk, so it survives.
        dry_run
            Only count them.
        now
            The current time in seconds since the epoch (``time.time()`` if omitted).

        Raises
        ------
        ConfigError
            If ``min_age_s`` is negative.
        StorageError
            If the directory cannot be listed or a file cannot be removed.
        """
        if not min_age_s >= 0:
            raise ConfigError(f"min_age_s must be >= 0, got {min_age_s}")
        cutoff = (time.time() if now is None else now) - min_age_s
        removed = 0
        try:
            entries = list(self._temporary.iterdir())
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StorageError(f"cannot list {self._temporary}: {exc}") from exc
        for entry in entries:
            if not entry.name.endswith(_TEMPORARY_SUFFIX):
                continue
            try:
                if not entry.is_file() or entry.stat().st_mtime >= cutoff:
                    continue
                if not dry_run:
                    entry.unlink()
            except FileNotFoundError:  # renamed into place or removed meanwhile
                continue
            except OSError as exc:
                raise StorageError(f"cannot remove {entry}: {exc}") from exc
            removed += 1
        if removed and not dry_run:
            self._sync_directory(self._temporary)
        return removed
