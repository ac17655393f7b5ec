"""How the run that published a version ended, as the audit trail records it.

A run writes ``run.started`` (``run.resumed`` when a crashed run continues) and
ends with ``run.completed`` or ``run.failed`` (whose ``status`` says
``interrupted`` for Ctrl-C / SIGTERM). The last of these events decides; a run
whose last event is a start has no recorded end: it is still running, or its
process was killed without a trace.

Only records that match their hash and link to their predecessor count
(:func:`fl_server.audit.reading.checked_records`): a ``run.completed`` typed into
the database by hand is not evidence. A damaged record of the run is reported,
never read. Reading never writes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from fl_server.audit import AuditEvent, AuditEventKind

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from fl_server.audit.reading import CheckedRecord

__all__ = [
    "AuditTrailOutcomes",
    "EventOutcomes",
    "RunOutcome",
    "RunOutcomeReader",
    "RunTrail",
    "run_trail",
]


class RunOutcome(Enum):
    """How a run ended, by its audit events (stable strings other tools read)."""

    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    RUNNING = "running"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class RunTrail:
    """What the audit trail says about one run: its outcome, and damage found on the way.

    ``problem`` names the first damaged record of the run (``None``: every record
    intact); the outcome was read from the intact records only.
    """

    outcome: RunOutcome
    problem: str | None = None


class RunOutcomeReader(Protocol):
    """Anything that can say how a run ended (the database, or events read already)."""

    def run_trail(self, run_id: str) -> RunTrail:
        """Return what the audit trail says about ``run_id``."""
        ...


_STARTS = frozenset({AuditEventKind.RUN_STARTED.value, AuditEventKind.RUN_RESUMED.value})
_COMPLETED = AuditEventKind.RUN_COMPLETED.value
_FAILED = AuditEventKind.RUN_FAILED.value
_INTERRUPTED = "interrupted"  # fl_server.run_summary.RunStatus.INTERRUPTED


def run_trail(records: Iterable[AuditEvent | CheckedRecord]) -> RunTrail:
    """Fold one run's records, in sequence order, into its outcome.

    Parameters
    ----------
    records
        The run's events (:class:`~fl_server.audit.AuditEvent`, already verified on
        read) or checked records (:class:`~fl_server.audit.reading.CheckedRecord`,
        whose damaged ones are skipped and reported).
    """
    outcome = RunOutcome.UNKNOWN
    problem: str | None = None
    for record in records:
        if isinstance(record, AuditEvent):
            kind, payload = record.kind.value, record.payload
        else:
            if record.problem is not None:
                problem = problem or f"record {record.seq} is damaged: {record.problem}"
                continue
            kind, payload = record.kind, record.payload
        if kind in _STARTS:
            outcome = RunOutcome.RUNNING
        elif kind == _COMPLETED:
            outcome = RunOutcome.COMPLETED
        elif kind == _FAILED:
            status = payload.get("status") if isinstance(payload, dict) else None
            outcome = RunOutcome.INTERRUPTED if status == _INTERRUPTED else RunOutcome.FAILED
    return RunTrail(outcome, problem)


class AuditTrailOutcomes:
    """Read run outcomes from a fedge database's audit trail, one run at a time, cached.

    Parameters
    ----------
    engine
        The fedge database (only read).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._cache: dict[str, RunTrail] = {}

    def run_trail(self, run_id: str) -> RunTrail:
        """Return what the trail says about ``run_id`` (its records checked as they are read).

        Raises
        ------
        StorageError
            If the database cannot be read.
        """
        from fl_server.audit.reading import checked_records

        if run_id not in self._cache:
            self._cache[run_id] = run_trail(checked_records(self._engine, run_id=run_id))
        return self._cache[run_id]


class EventOutcomes:
    """Run outcomes from audit events a caller has read already (a controller's own reader).

    Parameters
    ----------
    events
        Audit events in sequence order (as :meth:`fl_server.audit.AuditLog.iter`
        yields them, each verified on read); events of other kinds are ignored.
    """

    def __init__(self, events: Iterable[AuditEvent]) -> None:
        by_run: dict[str, list[AuditEvent]] = {}
        for event in events:
            if event.run_id is not None:
                by_run.setdefault(event.run_id, []).append(event)
        self._trails = {
            run_id: run_trail(sorted(run_events, key=lambda e: e.seq))
            for run_id, run_events in by_run.items()
        }

    def run_trail(self, run_id: str) -> RunTrail:
        """Return what the events say about ``run_id`` (``UNKNOWN`` if none name it)."""
        return self._trails.get(run_id, RunTrail(RunOutcome.UNKNOWN))
