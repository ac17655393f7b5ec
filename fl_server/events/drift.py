"""Turn drift reported by enough of the fleet into one retraining request.

:class:`DriftTrigger` counts the distinct devices whose ``drift`` events (body
``"drifted": true``, as :meth:`edge_runtime.drift.DriftReport.to_event` writes it)
the cloud received within a sliding window; when they reach ``threshold`` of the
fleet (and at least ``min_devices``), it appends one ``retraining.requested`` audit
event and calls the optional callback, then stays quiet until a full window has
passed, so a lasting drift asks once per window, not once per report.

Notes
-----
Windows are measured on the server's clock (``received_at``), never on the devices'.
The fraction counts devices, not reports: one device reporting drift a thousand
times is one device, so a single device cannot trigger retraining of the fleet.
The last request is read back from the audit trail after a restart, so a restart
does not ask again within the window.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from edge_runtime.device_events import DeviceEvent, EventKind
from fedge.errors import ConfigError, StorageError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.db.schema import AuditRecordRow
from fl_server.events.store import EventStore, stored_time

__all__ = ["DriftPolicy", "DriftTrigger", "RetrainingRequest", "is_drift_alert"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_NAMED_DEVICES = 32
_LOOKBACK_RECORDS = 200


def is_drift_alert(body: dict[str, Any]) -> bool:
    """Return whether a drift event's body reports drift (``"drifted": true``)."""
    return body.get("drifted") is True


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftPolicy:
    """When drift reports become a retraining request.

    Parameters
    ----------
    threshold
        The fraction of the fleet, in (0, 1], that must report drift within the window.
    window
        How far back reports count, and how long after a request the next may come.
    min_devices
        The fewest distinct devices that may trigger, >= 1 (a small fleet's guard).
    name
        Names this trigger (a model, a fleet) in the audit events, 1..64 of ``A-Za-z0-9._-``.
    """

    threshold: float
    window: timedelta = timedelta(hours=1)
    min_devices: int = 2
    name: str = "fleet"

    def __post_init__(self) -> None:
        if (
            not isinstance(self.threshold, int | float)
            or not math.isfinite(self.threshold)
            or not 0 < self.threshold <= 1
        ):
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold!r:.40}")
        if not isinstance(self.window, timedelta) or self.window <= timedelta(0):
            raise ConfigError(f"window must be a positive timedelta, got {self.window!r:.60}")
        if type(self.min_devices) is not int or self.min_devices < 1:
            raise ConfigError(f"min_devices must be an int >= 1, got {self.min_devices!r:.40}")
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigError(f"name must be 1..64 of A-Za-z0-9._-, got {self.name!r:.80}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetrainingRequest:
    """What a trigger saw when it asked for retraining."""

    name: str
    devices_reporting: int
    population: int
    fraction: float
    threshold: float
    window_start: datetime
    window_end: datetime
    devices: tuple[str, ...]  # the first few, sorted; all of them are in the event store


def _utc_now() -> datetime:
    return datetime.now(UTC)


class DriftTrigger:
    """Ask for retraining when enough distinct devices report drift within a window.

    Parameters
    ----------
    store
        The device events.
    audit
        Where ``retraining.requested`` is appended.
    policy
        Threshold, window, minimum and name.
    population
        Returns the fleet's size now (say, the registry's enrolled devices).
    on_request
        Called with each request after it is audited; its errors propagate.
    clock
        The server's time (timezone-aware).
    """

    def __init__(
        self,
        store: EventStore,
        audit: AuditLog,
        *,
        policy: DriftPolicy,
        population: Callable[[], int],
        on_request: Callable[[RetrainingRequest], object] | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._store = store
        self._audit = audit
        self._policy = policy
        self._population = population
        self._on_request = on_request
        self._clock = clock
        self._lock = threading.Lock()
        self._last: datetime | None = None
        self._last_loaded = False

    def observe(self, events: Sequence[DeviceEvent]) -> RetrainingRequest | None:
        """Check the window if ``events`` (just stored) hold a drift alert; see :meth:`check`."""
        if any(e.kind is EventKind.DRIFT and is_drift_alert(e.body) for e in events):
            return self.check()
        return None

    def check(self) -> RetrainingRequest | None:
        """Request retraining if the window's drifting devices reach the threshold.

        Returns
        -------
        RetrainingRequest | None
            The request made now, or ``None`` (below the threshold, or one was made
            less than a window ago).

        Raises
        ------
        StorageError
            If the events or the audit trail cannot be read or written.
        """
        now = self._clock()
        if not isinstance(now, datetime) or now.tzinfo is None:
            raise ConfigError("the trigger's clock must return timezone-aware datetimes")
        window = self._policy.window
        with self._lock:
            last = self._last_request()
            if last is not None and now < last + window:
                return None
            devices = self._store.devices_reporting(
                EventKind.DRIFT, received_after=now - window, where=is_drift_alert
            )
            population = self._population()
            if len(devices) < self._policy.min_devices or population < 1:
                return None
            fraction = len(devices) / population
            if fraction < self._policy.threshold:
                return None
            request = RetrainingRequest(
                name=self._policy.name,
                devices_reporting=len(devices),
                population=population,
                fraction=fraction,
                threshold=self._policy.threshold,
                window_start=now - window,
                window_end=now,
                devices=tuple(sorted(devices)[:_NAMED_DEVICES]),
            )
            self._audit.append(
                AuditEventKind.RETRAINING_REQUESTED,
                {
                    "trigger": request.name,
                    "reason": "drift",
                    "devices_reporting": request.devices_reporting,
                    "population": request.population,
                    "fraction": round(request.fraction, 6),
                    "threshold": request.threshold,
                    "window_start": stored_time(request.window_start),
                    "window_end": stored_time(request.window_end),
                    "devices": list(request.devices),
                },
            )
            self._last = now
        logger.warning(
            "drift on %d of %d devices (%.1f %%): retraining requested (%s)",
            request.devices_reporting,
            request.population,
            100 * request.fraction,
            request.name,
        )
        if self._on_request is not None:
            self._on_request(request)
        return request

    def _last_request(self) -> datetime | None:
        """Return when this trigger last asked (read once from the audit trail)."""
        if self._last_loaded:
            return self._last
        query = (
            select(AuditRecordRow.payload)
            .where(AuditRecordRow.kind == AuditEventKind.RETRAINING_REQUESTED.value)
            .order_by(AuditRecordRow.seq.desc())
            .limit(_LOOKBACK_RECORDS)
        )
        try:
            with Session(self._audit.engine) as session:
                for (payload,) in session.execute(query):
                    try:
                        document = json.loads(payload)
                        if document.get("trigger") == self._policy.name:
                            self._last = datetime.fromisoformat(document["window_end"])
                            break
                    except (ValueError, AttributeError, KeyError, TypeError):
                        continue
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read the audit trail: {type(exc).__name__}") from exc
        self._last_loaded = True
        return self._last
