"""Audit rejected device events without letting a flood of forgeries grow the trail.

Anyone who can publish to the broker can send malformed or forged events, and every
audit record is kept for good. :class:`RejectionRecorder` therefore works like the
gateway's :class:`~fl_server.enrolment.refusals.RefusalRecorder`: at most
``events_per_window`` ``device.events_rejected`` records of their own per window (a
minute by default), then ONE summary record when the window ends with how many more
were rejected, by reason and by topic device (the window's first ``max_devices`` by
name, the others as one count). A flood costs at most ``events_per_window + 1``
records per window.

Notes
-----
A record names the reason, the device id of the topic the event came on (a device
id is a short, restricted string; anything else is written ``"invalid"``) and, when
the event could be parsed, its claimed device and sequence number: never the
payload, a key or a signature. Duplicates are not rejections (QoS 1 delivers at least
once) and are only counted by the ingestor. A failed audit write is logged and
dropped: an event is refused the same way whether or not it could be recorded.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum

from edge_runtime.device_events import EventMalformed, check_device_id
from fedge.errors import ConfigError, FedgeError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.audit.events import JSONValue
from fl_server.events.store import stored_time

__all__ = ["RejectReason", "RejectionLimits", "RejectionRecorder"]

logger = logging.getLogger(__name__)

_INVALID = "invalid"


class RejectReason(Enum):
    """Why an event was refused. Values are stable strings written to the audit trail."""

    MALFORMED = "malformed"  # not a well-formed envelope (size, JSON, fields, canonical form)
    IDENTITY_MISMATCH = "identity_mismatch"  # it names a device its certificate does not
    BAD_SIGNATURE = "bad_signature"  # certificate or signature does not verify, or expired
    TOPIC_MISMATCH = "topic_mismatch"  # signed by one device, published on another's topic
    REVOKED = "revoked"  # the registry lists the device as revoked
    UNKNOWN_DEVICE = "unknown_device"  # the registry has no such device (with that key)
    SEQ_CONFLICT = "seq_conflict"  # another event already holds its (device, seq)


@dataclass(frozen=True, slots=True, kw_only=True)
class RejectionLimits:
    """How many rejection records a window may hold.

    Parameters
    ----------
    events_per_window
        Individual records per window, >= 0.
    window
        The window's length, > 0.
    max_devices
        Devices named in a summary (the window's first), >= 1; the rest are counted together.
    """

    events_per_window: int = 10
    window: timedelta = timedelta(minutes=1)
    max_devices: int = 16

    def __post_init__(self) -> None:
        if type(self.events_per_window) is not int or self.events_per_window < 0:
            raise ConfigError(f"events_per_window must be >= 0, got {self.events_per_window!r}")
        if not isinstance(self.window, timedelta) or self.window <= timedelta(0):
            raise ConfigError(f"window must be a positive timedelta, got {self.window!r}")
        if type(self.max_devices) is not int or self.max_devices < 1:
            raise ConfigError(f"max_devices must be >= 1, got {self.max_devices!r}")


@dataclass(slots=True)
class _Window:
    started: datetime
    written: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    devices: Counter[str] = field(default_factory=Counter)
    other_devices: int = 0

    @property
    def suppressed(self) -> int:
        return sum(self.reasons.values())


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _clean_device(device: str | None) -> str:
    if device is None:
        return _INVALID
    try:
        return check_device_id(device)
    except EventMalformed:
        return _INVALID


class RejectionRecorder:
    """Append ``device.events_rejected`` records, at most so many per window.

    Parameters
    ----------
    audit
        The deployment's audit log.
    limits
        How many records a window may hold.
    clock
        Returns the current time (timezone-aware); injected so tests control time.
    """

    def __init__(
        self,
        audit: AuditLog,
        *,
        limits: RejectionLimits | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._audit = audit
        self._limits = limits or RejectionLimits()
        self._clock = clock
        self._window: _Window | None = None
        self._lock = threading.Lock()

    def record(
        self,
        reason: RejectReason,
        topic_device: str | None,
        *,
        device: str | None = None,
        seq: int | None = None,
    ) -> bool:
        """Record one rejected event; return whether it got its own record (else it is counted).

        Parameters
        ----------
        reason
            Why it was refused.
        topic_device
            The device id of the topic it came on (``None`` when the topic is not an
            event topic).
        device, seq
            The device and sequence number the event claims, when it could be parsed.

        Raises
        ------
        ConfigError
            If ``reason`` is not a :class:`RejectReason` (a programming error).
        """
        if not isinstance(reason, RejectReason):
            raise ConfigError(f"{reason!r} is not a RejectReason")
        where = _clean_device(topic_device)
        moment = self._now()
        with self._lock:
            window = self._current(moment)
            if window.written >= self._limits.events_per_window:
                window.reasons[reason.value] += 1
                if where in window.devices or len(window.devices) < self._limits.max_devices:
                    window.devices[where] += 1
                else:
                    window.other_devices += 1
                return False
            window.written += 1
            payload: dict[str, JSONValue] = {
                "summary": False,
                "reason": reason.value,
                "topic_device": where,
            }
            if device is not None:
                payload["device"] = _clean_device(device)
            if seq is not None:
                payload["seq"] = seq
            self._append(payload)
            return True

    def flush(self) -> None:
        """Write the summary of the window if it has ended."""
        moment = self._now()
        with self._lock:
            if self._window is not None:
                self._current(moment)

    def close(self) -> None:
        """Write the summary of the current window, ended or not (at shutdown)."""
        moment = self._now()
        with self._lock:
            if self._window is not None:
                self._summarise(self._window, moment)
            self._window = None

    def _now(self) -> datetime:
        moment = self._clock()
        if not isinstance(moment, datetime) or moment.tzinfo is None:
            raise ConfigError("the rejection clock must return timezone-aware datetimes")
        return moment

    def _current(self, moment: datetime) -> _Window:
        window = self._window
        if window is not None and moment < window.started + self._limits.window:
            return window
        if window is not None:
            self._summarise(window, window.started + self._limits.window)
        self._window = _Window(started=moment)
        return self._window

    def _summarise(self, window: _Window, ended: datetime) -> None:
        if window.suppressed == 0:
            return
        self._append(
            {
                "summary": True,
                "suppressed": window.suppressed,
                "limit": self._limits.events_per_window,
                "window_start": stored_time(window.started),
                "window_end": stored_time(ended),
                "reasons": dict(sorted(window.reasons.items())),
                "topic_devices": dict(sorted(window.devices.items())),
                "other_devices": window.other_devices,
            }
        )

    def _append(self, payload: dict[str, JSONValue]) -> None:
        try:
            self._audit.append(AuditEventKind.DEVICE_EVENTS_REJECTED, payload)
        except FedgeError as exc:
            logger.error("cannot audit a rejected device event: %s", exc)
