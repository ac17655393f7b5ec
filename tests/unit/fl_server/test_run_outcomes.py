"""How a run ended, from its audit events: the fold, the database reader, events read already."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_server.audit import AuditEventKind, AuditLog
from fl_server.audit.events import JSONValue
from fl_server.db import open_database
from fl_server.store.run_outcomes import (
    AuditTrailOutcomes,
    EventOutcomes,
    RunOutcome,
    RunTrail,
)

STARTED, RESUMED = AuditEventKind.RUN_STARTED, AuditEventKind.RUN_RESUMED
COMPLETED, FAILED = AuditEventKind.RUN_COMPLETED, AuditEventKind.RUN_FAILED


@pytest.mark.parametrize(
    ("events", "outcome"),
    [
        ([], RunOutcome.UNKNOWN),
        ([(STARTED, {})], RunOutcome.RUNNING),
        ([(STARTED, {}), (COMPLETED, {})], RunOutcome.COMPLETED),
        ([(STARTED, {}), (FAILED, {"status": "failed"})], RunOutcome.FAILED),
        ([(STARTED, {}), (FAILED, {"status": "interrupted"})], RunOutcome.INTERRUPTED),
        ([(STARTED, {}), (FAILED, {"status": "interrupted"}), (RESUMED, {})], RunOutcome.RUNNING),
        ([(STARTED, {}), (FAILED, {}), (RESUMED, {}), (COMPLETED, {})], RunOutcome.COMPLETED),
        ([(AuditEventKind.ROUND_COMPLETED, {"round": 1})], RunOutcome.UNKNOWN),
    ],
)
def test_the_last_start_or_end_decides(
    tmp_path: Path, events: list[tuple[AuditEventKind, dict[str, JSONValue]]], outcome: RunOutcome
) -> None:
    engine = open_database(f"sqlite:///{tmp_path / 'fedge.db'}")
    try:
        log = AuditLog(engine)
        log.append(STARTED, {}, run_id="other")  # another run's events never count
        log.append(COMPLETED, {}, run_id="other")
        for kind, payload in events:
            log.append(kind, payload, run_id="run-1")
        read = AuditTrailOutcomes(engine).run_trail("run-1")
        given = EventOutcomes(log.iter()).run_trail("run-1")
    finally:
        engine.dispose()

    assert read == given == RunTrail(outcome)


def test_a_damaged_record_is_reported_and_not_read(tmp_path: Path) -> None:
    engine = open_database(f"sqlite:///{tmp_path / 'fedge.db'}")
    try:
        log = AuditLog(engine)
        log.append(STARTED, {}, run_id="run-1")
        log.append(COMPLETED, {"rounds": 3}, run_id="run-1")
        with engine.begin() as connection:
            connection.exec_driver_sql(
                "UPDATE audit_events SET payload = '{\"rounds\":4}' WHERE kind = 'run.completed'"
            )
        trail = AuditTrailOutcomes(engine).run_trail("run-1")
    finally:
        engine.dispose()

    assert trail.outcome is RunOutcome.RUNNING
    assert trail.problem is not None and trail.problem.startswith("record 2 is damaged")
