"""Write at most so many audit records per window, then one summary of the rest.

Every audit record is kept for good, so a component that audits what outsiders can
trigger at will (forged events, bad tokens) must bound what a flood costs.
:class:`WindowedRecorder` keeps one window per key (say an event kind): the first
``events_per_window`` records of a window are written on their own, the rest are only
counted, by reason and by name (the window's first ``max_names`` distinct names, the
others as one count, so the summary's size is bounded too), and ONE summary record is
written when the window ends. A flood thus costs at most ``events_per_window + 1``
records per key per window, whatever its rate and however many names it comes under.

A window's summary is written by the first record after the window ends, by
:meth:`WindowedRecorder.flush` or by :meth:`WindowedRecorder.close`. A failed audit
write is logged and dropped: the caller acts the same whether or not it could be
recorded.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

from fedge.errors import ConfigError, FedgeError
from fl_server.audit.events import AuditEventKind, JSONValue
from fl_server.audit.log import AuditLog

__all__ = ["WindowLimits", "WindowedRecorder", "check_at_least", "check_window"]

KeyT = TypeVar("KeyT", bound=Hashable)


def check_at_least(name: str, value: int, least: int) -> None:
    """Check that a limit is a whole number (not a bool) of at least ``least``.

    Raises
    ------
    ConfigError
        If it is not, naming the limit ``name``.
    """
    if type(value) is not int or value < least:
        raise ConfigError(f"{name} must be >= {least}, got {value!r}")


def check_window(window: timedelta) -> None:
    """Check that a window's length is a positive timedelta.

    Raises
    ------
    ConfigError
        If it is not.
    """
    if not isinstance(window, timedelta):
        raise ConfigError(f"window must be a timedelta, got {window!r}")
    if window <= timedelta(0):
        raise ConfigError(f"window must be positive, got {window!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowLimits:
    """How many records a window may hold and how many names its summary lists.

    Parameters
    ----------
    events_per_window
        Individual records per key per window, >= 0.
    window
        The window's length, > 0.
    max_names
        Names listed in a summary (the window's first), >= 1; the rest are counted together.
    """

    events_per_window: int
    window: timedelta
    max_names: int

    def __post_init__(self) -> None:
        check_at_least("events_per_window", self.events_per_window, 0)
        check_window(self.window)
        check_at_least("max_names", self.max_names, 1)


@dataclass(slots=True)
class Window:
    """What one key's window wrote and what it only counted."""

    started: datetime
    written: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    names: Counter[str] = field(default_factory=Counter)
    other_names: int = 0

    @property
    def suppressed(self) -> int:
        """How many records the window counted instead of writing."""
        return sum(self.reasons.values())


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


class WindowedRecorder(ABC, Generic[KeyT]):
    """Append audit records, at most so many per key per window, then one summary.

    A subclass checks and builds its records, hands each to :meth:`_record` and says
    what its summaries look like in :meth:`_summary`.

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
        limits: WindowLimits,
        *,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._audit = audit
        self._limits = limits
        self._clock = clock
        self._windows: dict[KeyT, Window] = {}
        self._lock = threading.Lock()
        # Failures are logged under the subclass's module, as before the recorders shared this.
        self._logger = logging.getLogger(type(self).__module__)

    def flush(self) -> None:
        """Write the summary of every window that has ended."""
        moment = self._now()
        with self._lock:
            for key in list(self._windows):
                self._current(key, moment)

    def close(self) -> None:
        """Write the summary of every window, ended or not (at shutdown)."""
        moment = self._now()
        with self._lock:
            for key, window in list(self._windows.items()):
                self._summarise(key, window, moment)
            self._windows.clear()

    def _record(
        self,
        key: KeyT,
        kind: AuditEventKind,
        payload: Mapping[str, JSONValue],
        *,
        reason: str,
        name: str,
    ) -> bool:
        """Append a record if ``key``'s window has room, else count it; return whether it was.

        Parameters
        ----------
        key
            The window it falls in.
        kind, payload
            Its own record.
        reason, name
            What the window's summary counts it under.
        """
        moment = self._now()
        with self._lock:
            window = self._current(key, moment)
            if window.written >= self._limits.events_per_window:
                window.reasons[reason] += 1
                if name in window.names or len(window.names) < self._limits.max_names:
                    window.names[name] += 1
                else:
                    window.other_names += 1
                return False
            window.written += 1
            self._append(kind, payload)
            return True

    @abstractmethod
    def _summary(
        self, key: KeyT, counts: dict[str, JSONValue], names: dict[str, int], other_names: int
    ) -> tuple[AuditEventKind, Mapping[str, JSONValue]]:
        """Return the kind and payload of the summary of ``key``'s window.

        Parameters
        ----------
        key
            The window's key.
        counts
            ``suppressed``, ``limit``, ``window_start``, ``window_end`` and ``reasons``.
        names, other_names
            How many records each listed name had, and how many the others had together.
        """

    def _now(self) -> datetime:
        moment = self._clock()
        if not isinstance(moment, datetime) or moment.tzinfo is None:
            raise ConfigError(f"the clock must return timezone-aware datetimes, got {moment!r}")
        return moment

    def _current(self, key: KeyT, moment: datetime) -> Window:
        window = self._windows.get(key)
        if window is not None and moment < window.started + self._limits.window:
            return window
        if window is not None:
            self._summarise(key, window, window.started + self._limits.window)
        fresh = Window(started=moment)
        self._windows[key] = fresh
        return fresh

    def _summarise(self, key: KeyT, window: Window, ended: datetime) -> None:
        if window.suppressed == 0:
            return
        counts: dict[str, JSONValue] = {
            "suppressed": window.suppressed,
            "limit": self._limits.events_per_window,
            "window_start": _stamp(window.started),
            "window_end": _stamp(ended),
            "reasons": dict(sorted(window.reasons.items())),
        }
        names = dict(sorted(window.names.items()))
        self._append(*self._summary(key, counts, names, window.other_names))

    def _append(self, kind: AuditEventKind, payload: Mapping[str, JSONValue]) -> None:
        try:
            self._audit.append(kind, payload)
        except FedgeError as exc:
            self._logger.error("cannot audit %s (%s): %s", kind.value, payload.get("reason"), exc)
