"""The store server's records: its access log, and the audit of completed downloads.

Used by :mod:`fl_server.store.serve` (see its docstring for the line format and
when a download counts as completed).
"""

from __future__ import annotations

import io
import logging
import os
import queue
import threading
from pathlib import Path
from typing import IO, Any, NamedTuple

from fedge.errors import StorageError
from fl_server.store.store import ModelStore

__all__ = [
    "ACCESS_LOGGER",
    "AccessLog",
    "CountingWriter",
    "Download",
    "DownloadRecorder",
    "printable",
]

logger = logging.getLogger(__name__)
ACCESS_LOGGER = "fedge.store.access"
_access = logging.getLogger(ACCESS_LOGGER)

_MAX_LOGGED = 256  # characters of a path, method or device id in the access log
# Completed downloads waiting for the audit writer; past this, handlers wait (backpressure).
_MAX_PENDING_RECORDS = 10_000


def printable(text: str) -> str:
    """Return ``text`` for one log field: no spaces, nothing outside printable ASCII."""
    text = text[:_MAX_LOGGED] or "-"
    return "".join(c if "!" <= c <= "~" else f"%{ord(c) & 0xFF:02X}" for c in text)


class AccessLog:
    """One line per request to :data:`ACCESS_LOGGER` and, when ``path`` is set, to that file."""

    def __init__(self, path: Path | None) -> None:
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise StorageError(f"cannot open the access log {path}: {exc}") from exc
        self._file = os.fdopen(fd, "a", encoding="ascii")
        self._path = path

    def write(self, line: str) -> None:
        _access.info("%s", line)
        if self._file is None:
            return
        # One write of the whole line under the lock, to a file opened O_APPEND: lines
        # from concurrent requests (or another process) never interleave.
        with self._lock:
            try:
                self._file.write(line + "\n")
                self._file.flush()
            except (OSError, ValueError) as exc:
                logger.error("store server: cannot append to %s: %s", self._path, exc)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()


class Download(NamedTuple):
    device: str
    digest: str
    size: int
    ranged: bool


class DownloadRecorder:
    """Append ``store.downloaded`` events from one thread, in the order downloads completed."""

    def __init__(self, store: ModelStore) -> None:
        self._store = store
        self._queue: queue.Queue[Download | None] = queue.Queue(_MAX_PENDING_RECORDS)
        self._thread = threading.Thread(target=self._run, name="store-download-audit", daemon=True)
        self._closed = False
        self._thread.start()

    def record(self, download: Download) -> None:
        if self._closed:  # a handler that outlived stop(): append from its own thread
            self._append(download)
        else:
            self._queue.put(download)

    def _append(self, download: Download) -> None:
        try:
            self._store.record_download(
                download.device, download.digest, download.size, ranged=download.ranged
            )
        except Exception:  # the download itself stands; the trail's writer is told why
            logger.exception(
                "store server: cannot record the download of %s by device %s in the audit trail",
                download.digest,
                download.device,
            )

    def _run(self) -> None:
        while (download := self._queue.get()) is not None:
            self._append(download)

    def close(self, timeout_s: float) -> None:
        """Append what is queued (for up to ``timeout_s``), then stop the thread."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.error(
                "store server: %d downloads were not yet recorded in the audit trail at stop",
                self._queue.qsize(),
            )


class CountingWriter(io.BufferedIOBase):
    """The connection's writer, counting what was written (for the access log)."""

    def __init__(self, inner: io.BufferedIOBase) -> None:
        super().__init__()
        self._inner = inner
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any, /) -> int:
        count = self._inner.write(data)
        self.written += count
        return count

    def flush(self) -> None:
        self._inner.flush()

    def close(self) -> None:
        try:
            super().close()  # flushes first
        finally:
            self._inner.close()
