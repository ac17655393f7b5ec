"""Audit rejected device events without letting a flood of forgeries grow the trail.

Anyone who can publish to the broker can send malformed or forged events, and every
audit record is kept for good. :class:`RejectionRecorder` is therefore a
:class:`~fl_server.audit.rate_limit.WindowedRecorder` with one window: at most
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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum

from edge_runtime.device_events import EventMalformed, check_device_id
from fedge.errors import ConfigError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.audit.events import JSONValue
from fl_server.audit.rate_limit import WindowedRecorder, WindowLimits, check_at_least, check_window

__all__ = ["RejectReason", "RejectionLimits", "RejectionRecorder"]

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
        check_at_least("events_per_window", self.events_per_window, 0)
        check_window(self.window)
        check_at_least("max_devices", self.max_devices, 1)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _clean_device(device: str | None) -> str:
    if device is None:
        return _INVALID
    try:
        return check_device_id(device)
    except EventMalformed:
        return _INVALID


class RejectionRecorder(WindowedRecorder[None]):
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
        limits = limits or RejectionLimits()
        window_limits = WindowLimits(
            events_per_window=limits.events_per_window,
            window=limits.window,
            max_names=limits.max_devices,
        )
        super().__init__(audit, window_limits, clock=clock)

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
        payload: dict[str, JSONValue] = {
            "summary": False,
            "reason": reason.value,
            "topic_device": where,
        }
        if device is not None:
            payload["device"] = _clean_device(device)
        if seq is not None:
            payload["seq"] = seq
        kind = AuditEventKind.DEVICE_EVENTS_REJECTED
        return self._record(None, kind, payload, reason=reason.value, name=where)

    def _summary(
        self, key: None, counts: dict[str, JSONValue], names: dict[str, int], other_names: int
    ) -> tuple[AuditEventKind, Mapping[str, JSONValue]]:
        payload = {"summary": True, **counts, "topic_devices": names, "other_devices": other_names}
        return AuditEventKind.DEVICE_EVENTS_REJECTED, payload
