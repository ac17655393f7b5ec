"""Audit refusals of unauthenticated callers without letting a flood grow the trail.

Anyone who reaches the gateway can present a bad token or a forged signature,
and every audit record is kept for good. :class:`RefusalRecorder` therefore
writes at most ``events_per_window`` records of one kind per window (a minute by
default) and counts the rest; when the window ends it writes ONE
``audit.suppressed`` record with how many were not written, by reason and by
peer (the first ``max_peers`` distinct peers of the window by name, the others
as one count, so the summary's size is bounded too). A
flood thus costs at most ``events_per_window + 1`` records per kind per window,
whatever its rate and however many addresses it comes from.

Notes
-----
The limit is global per kind, not per peer: a per-peer limit is unbounded
against a caller with many addresses. The cost is that during a flood the
individual records of other callers' refusals are folded into the summary's
counts (their reasons and peers are still counted there). The ``details``
given with a refusal are kept only in individual records, never in a summary.

Payloads carry a reason category and the peer address, never what the caller
sent (a token, a key, a signature): whatever a caller types must not reach
the tamper-evident trail, where it could not be erased.

The window mechanism is :class:`~fl_server.audit.rate_limit.WindowedRecorder`'s:
a window's summary is written by the first refusal after the window ends, by
:meth:`RefusalRecorder.flush` (the gateway calls it periodically) or by
:meth:`RefusalRecorder.close`. A failed audit write is logged and dropped: a
refusal is answered the same way whether or not it could be recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fedge.errors import ConfigError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.audit.events import JSONValue
from fl_server.audit.rate_limit import WindowedRecorder, WindowLimits, check_at_least, check_window

__all__ = ["RATE_LIMITED_KINDS", "RefusalLimits", "RefusalRecorder"]

RATE_LIMITED_KINDS = frozenset({AuditEventKind.ENROLMENT_REFUSED, AuditEventKind.AUTH_FAILED})
_MAX_REASON = 64
_MAX_PEER = 128
_UNKNOWN_PEER = "unknown"


@dataclass(frozen=True, slots=True, kw_only=True)
class RefusalLimits:
    """How many refusal records of one kind a window may hold.

    Parameters
    ----------
    events_per_window
        Individual records per kind per window, >= 1.
    window
        The window's length, > 0.
    max_peers
        Peers named in a summary (the window's first), >= 1; the rest are counted together.
    """

    events_per_window: int = 30
    window: timedelta = timedelta(minutes=1)
    max_peers: int = 16

    def __post_init__(self) -> None:
        check_at_least("events_per_window", self.events_per_window, 1)
        check_window(self.window)
        check_at_least("max_peers", self.max_peers, 1)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _clean_reason(reason: str) -> str:
    if (
        not isinstance(reason, str)
        or not 0 < len(reason) <= _MAX_REASON
        or not all(c.isascii() and (c.isalnum() or c in "_.-") for c in reason)
    ):
        raise ConfigError(f"a refusal reason is a short identifier, got {reason!r}")
    return reason


def _clean_peer(peer: str | None) -> str:
    """Return ``peer`` if it is a short printable address, else ``"unknown"``."""
    if isinstance(peer, str) and 0 < len(peer) <= _MAX_PEER and peer.isprintable():
        return peer
    return _UNKNOWN_PEER


class RefusalRecorder(WindowedRecorder[AuditEventKind]):
    """Append refusal events to the audit log, at most so many per kind per window.

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
        limits: RefusalLimits | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        limits = limits or RefusalLimits()
        window_limits = WindowLimits(
            events_per_window=limits.events_per_window,
            window=limits.window,
            max_names=limits.max_peers,
        )
        super().__init__(audit, window_limits, clock=clock)

    def record(
        self,
        kind: AuditEventKind,
        reason: str,
        peer: str | None,
        details: Mapping[str, JSONValue] | None = None,
    ) -> bool:
        """Record one refusal; return whether it got its own record (else it is counted).

        Parameters
        ----------
        kind
            ``enrolment.refused`` or ``auth.failed``.
        reason
            A short category (letters, digits, ``_.-``), never caller input.
        peer
            The caller's address as the server saw it (``"unknown"`` when it is
            missing or malformed).
        details
            More server-derived, non-secret fields for the individual record
            (say a token id); they must not repeat ``reason`` or ``peer``.

        Raises
        ------
        ConfigError
            If ``kind`` is not a rate-limited kind or ``reason`` is malformed
            (programming errors, not caller input).
        """
        if kind not in RATE_LIMITED_KINDS:
            raise ConfigError(f"{kind!r} is not a refusal kind")
        category = _clean_reason(reason)
        address = _clean_peer(peer)
        extra = dict(details or {})
        if {"reason", "peer"} & set(extra):
            raise ConfigError("details must not repeat reason or peer")
        payload = {"reason": category, "peer": address, **extra}
        return self._record(kind, kind, payload, reason=category, name=address)

    def _summary(
        self,
        key: AuditEventKind,
        counts: dict[str, JSONValue],
        names: dict[str, int],
        other_names: int,
    ) -> tuple[AuditEventKind, Mapping[str, JSONValue]]:
        payload = {"kind": key.value, **counts, "peers": names, "other_peers": other_names}
        return AuditEventKind.AUDIT_SUPPRESSED, payload
