"""Keep telemetry on an offline device until the cloud is reachable again.

:class:`~edge_runtime.edge_filter.EdgeFilter` turns a stream of inference results into a few
JSON events (anomalies, drift reports and periodic aggregates, never raw inputs);
:class:`TelemetryBuffer` holds those events on disk until :meth:`TelemetryBuffer.flush`
reaches the cloud::

    for event in edge_filter.observe(images, logits, drift=detector.check()):
        buffer.append(event)
    buffer.flush(upload)  # raises TelemetryOffline while the network is down

Notes
-----
The buffer is a directory of JSON-lines segments (``segment-<first seq>.jsonl``,
rotated every ``segment_records``) plus ``state.json`` holding the first live
sequence number and the dropped counter. ``append`` returns only after the line is
fsynced; ``state.json`` is replaced atomically (temp file, fsync, ``os.replace``,
directory fsync), and records are removed only by advancing that head, so a crash at
any point loses no acknowledged record: a torn last line is cut off on reopen, and a
batch whose acknowledgement was not yet recorded is sent again (at-least-once; upstream
de-duplicates on content if it must).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

from edge_runtime._json import canonical_bytes as _canonical
from edge_runtime.durable import fsync_directory
from fedge.errors import ConfigError, FedgeError, StorageError

__all__ = ["DROPPED_EVENT_KIND", "TelemetryBuffer", "TelemetryOffline"]

logger = logging.getLogger(__name__)

DROPPED_EVENT_KIND = "telemetry.dropped"
_FORMAT = "fedge/telemetry/v1"
_STATE = "state.json"
_SEGMENT = re.compile(r"segment-(\d{20})\.jsonl")
_MAX_EVENT_BYTES = 16_384  # an event is a summary; anything larger is probably raw data


class TelemetryOffline(FedgeError, ConnectionError):  # noqa: N818 - reads as what happened
    """``send`` failed during a flush; every record not yet sent stays buffered."""

    def __init__(self, sent: int, remaining: int) -> None:
        super().__init__(f"telemetry upload failed after {sent} records; {remaining} stay buffered")
        self.sent = sent
        self.remaining = remaining


class TelemetryBuffer:
    """A bounded, crash-safe on-disk queue of JSON events, oldest dropped first.

    Parameters
    ----------
    path
        The buffer's directory (created if missing); reopening it resumes the queue.
    max_records
        How many events it keeps; appending to a full buffer drops the oldest and
        counts them in :attr:`dropped`.
    segment_records
        Events per segment file; a segment is deleted once all its events are gone.

    Raises
    ------
    ConfigError
        If a size is below 1.
    StorageError
        If the directory cannot be used, or a segment or ``state.json`` is corrupt
        anywhere but in a torn last line.

    Notes
    -----
    Safe to share between an inference thread (``append``) and an upload thread
    (``flush``); ``send`` runs outside the lock. An event dropped while the batch that
    holds it is in flight is both delivered and counted as dropped.
    """

    def __init__(
        self, path: Path, *, max_records: int = 10_000, segment_records: int = 1_000
    ) -> None:
        for name, value in (("max_records", max_records), ("segment_records", segment_records)):
            if type(value) is not int or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r:.40}")
        self._directory = Path(path)
        self._max_records = max_records
        self._segment_records = segment_records
        self._lock = threading.Lock()
        self._records: deque[tuple[int, bytes]] = deque()  # (seq, canonical event JSON)
        self._segments: list[int] = []  # first seq of each segment file, ascending
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            self._head, self._dropped = self._read_state()
            self._next = self._load()
            self._compact()  # segments a crash left behind after their events were sent
            self._drop_beyond_bound()
        except StorageError:
            raise
        except OSError as error:
            raise StorageError(f"cannot use telemetry buffer {str(path)!r}: {error}") from error

    def __len__(self) -> int:
        return len(self._records)

    @property
    def dropped(self) -> int:
        """How many events were dropped (buffer full) and not yet reported upstream."""
        return self._dropped

    def _read_state(self) -> tuple[int, int]:
        path = self._directory / _STATE
        if not path.exists():
            return 0, 0
        try:
            state = json.loads(path.read_bytes())
            head, dropped = state["head"], state["dropped"]
            valid = state["format"] == _FORMAT and all(
                type(value) is int and value >= 0 for value in (head, dropped)
            )
        except (ValueError, TypeError, KeyError):
            valid = False
        if not valid:
            raise StorageError(f"telemetry state {str(path)!r} is corrupt")
        return head, dropped

    def _write_state(self) -> None:
        temporary = self._directory / f"{_STATE}.tmp"
        state = {"format": _FORMAT, "head": self._head, "dropped": self._dropped}
        with open(temporary, "wb") as handle:
            handle.write(_canonical(state))
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(self._directory / _STATE)
        fsync_directory(self._directory)

    def _load(self) -> int:
        """Read every segment into memory; return the next sequence number."""
        paths = sorted(
            (int(match[1]), path)
            for path in self._directory.iterdir()
            if (match := _SEGMENT.fullmatch(path.name))
        )
        expected: int | None = None
        for position, (first, path) in enumerate(paths):
            is_last = position == len(paths) - 1
            data = path.read_bytes()
            lines = data.split(b"\n")
            kept = 0  # bytes of the good lines
            for number, line in enumerate(lines[:-1]):
                record = self._parse(line, first + number)
                if record is None:
                    if is_last and number == len(lines) - 2:
                        break  # a torn write that ended in garbage
                    raise StorageError(
                        f"telemetry segment {path.name} line {number + 1} is corrupt"
                    )
                kept += len(line) + 1
                if record[0] >= self._head:
                    self._records.append(record)
            if kept != len(data):
                if not is_last:
                    raise StorageError(f"telemetry segment {path.name} ends in a partial line")
                logger.warning("dropping a torn last line (%d bytes) of %s", len(data) - kept, path)
                os.truncate(path, kept)
            if expected is not None and first != expected:
                raise StorageError(f"telemetry segment {path.name} does not follow on")
            expected = first + data[:kept].count(b"\n")
            self._segments.append(first)
        return max(self._head, expected or 0)

    @staticmethod
    def _parse(line: bytes, seq: int) -> tuple[int, bytes] | None:
        try:
            record = json.loads(line)
            if (
                isinstance(record, dict)
                and set(record) == {"seq", "event"}
                and type(record["seq"]) is int
                and record["seq"] == seq
                and isinstance(record["event"], dict)
            ):
                return seq, _canonical(record["event"])
        except ValueError:  # not JSON, or NaN inside
            pass
        return None

    def _drop_beyond_bound(self) -> None:
        excess = len(self._records) - self._max_records
        if excess <= 0:
            return
        for _ in range(excess):
            self._records.popleft()
        self._head = self._records[0][0]
        self._dropped += excess
        # Warn when dropping starts, not on every append of a long outage.
        log = logger.warning if self._dropped == excess else logger.debug
        log("telemetry buffer full: dropped the %d oldest events", excess)
        self._write_state()
        self._compact()

    def _compact(self) -> None:
        ends = [*self._segments[1:], self._next]
        for first, end in zip(list(self._segments), ends[: len(self._segments)], strict=True):
            if end > self._head:
                break
            (self._directory / f"segment-{first:020d}.jsonl").unlink(missing_ok=True)
            self._segments.remove(first)

    @staticmethod
    def _write_line(path: Path, line: bytes) -> None:
        with open(path, "ab") as handle:
            size = handle.tell()
            try:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            except OSError:
                handle.truncate(size)  # never leave a partial line for the next append
                raise

    def append(self, event: Mapping[str, Any]) -> int:
        """Write one event durably (fsynced) and return its sequence number.

        Raises
        ------
        ConfigError
            If the event is not a JSON object of finite values, or over 16 KiB.
        StorageError
            If the disk write fails; the event is then not buffered.
        """
        if not isinstance(event, Mapping):
            raise ConfigError(f"an event must be a mapping, got {type(event).__name__}")
        try:
            encoded = _canonical(dict(event))
        except (TypeError, ValueError) as error:
            raise ConfigError(f"an event must be finite, plain JSON: {error}") from None
        if len(encoded) > _MAX_EVENT_BYTES:
            raise ConfigError(f"an event must be at most {_MAX_EVENT_BYTES} bytes of JSON")
        with self._lock:
            seq = self._next
            line = b'{"event":' + encoded + b',"seq":' + str(seq).encode() + b"}\n"
            try:
                if not self._segments or seq - self._segments[-1] >= self._segment_records:
                    self._segments.append(seq)
                    (self._directory / f"segment-{seq:020d}.jsonl").touch()
                    fsync_directory(self._directory)
                self._write_line(self._directory / f"segment-{self._segments[-1]:020d}.jsonl", line)
                self._next = seq + 1
                self._records.append((seq, encoded))
                self._drop_beyond_bound()
            except OSError as error:
                raise StorageError(f"cannot append telemetry: {error}") from error
        return seq

    def flush(self, send: Callable[[list[dict[str, Any]]], None], *, batch_size: int = 100) -> int:
        """Send buffered events oldest-first in batches; forget each batch once sent.

        If events were dropped, the first batch starts with a synthetic event
        ``{"kind": "telemetry.dropped", "count": n}`` and the counter is reduced by
        ``n`` once that batch is sent. Events appended during the flush wait for the next.

        Parameters
        ----------
        send
            Uploads one batch; returning means upstream has it, raising means it may not.
        batch_size
            Most events per call of ``send``, the synthetic one included.

        Returns
        -------
        int
            How many buffered events were sent (the synthetic one not counted).

        Raises
        ------
        ConfigError
            If ``batch_size`` is below 1.
        TelemetryOffline
            If ``send`` raises; it is chained, and nothing unsent is lost.
        StorageError
            If recording a sent batch fails; that batch will be sent again.
        """
        if type(batch_size) is not int or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r:.40}")
        sent = 0
        with self._lock:
            end = self._next
        while True:
            with self._lock:
                dropped = self._dropped
                room = batch_size - (1 if dropped else 0)
                batch = [record for record in islice(self._records, room) if record[0] < end]
            events = [{"kind": DROPPED_EVENT_KIND, "count": dropped}] if dropped else []
            events += [json.loads(encoded) for _, encoded in batch]
            if not events:
                return sent
            try:
                send(events)
            except Exception as error:  # any failure of the uplink means "still offline"
                remaining = len(self)
                logger.warning(
                    "telemetry upload failed after %d events, %d stay buffered: %s",
                    sent,
                    remaining,
                    error,
                )
                raise TelemetryOffline(sent, remaining) from error
            with self._lock:
                if batch:
                    last = batch[-1][0]
                    while self._records and self._records[0][0] <= last:
                        self._records.popleft()
                    self._head = max(self._head, last + 1)
                self._dropped -= dropped
                try:
                    self._write_state()
                    self._compact()
                except OSError as error:
                    raise StorageError(f"cannot record sent telemetry: {error}") from error
            sent += len(batch)
            if not batch:  # only the dropped count was left: done, even if more drops came
                return sent
